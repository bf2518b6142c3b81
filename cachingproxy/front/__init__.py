"""The HTTP front: the channel, request classification, limits, authentication and the responses the proxy writes itself."""
