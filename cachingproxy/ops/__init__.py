"""Operations: statistics, metrics, the status pages, admin actions, the access log and the cache tool."""
