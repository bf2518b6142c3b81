"""TLS: CONNECT tunnels, SNI interception, the local CA."""
