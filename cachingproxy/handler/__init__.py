"""The request handler: deciding what to serve (values) and sending it."""
