"""sessionsync daemon: watch session folders and mirror state.json into SQL."""
