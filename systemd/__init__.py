"""The systemd unit files, shipped as package data so `sessionsync install-unit` can render them."""
