"""Data contracts shared by the daemon and the client: state.json, tables, events, control."""
