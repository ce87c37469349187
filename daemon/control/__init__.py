"""Control socket: protocol, server, handlers and the light client."""
