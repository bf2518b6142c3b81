"""The cache: freshness policy, header rules, entries and the stores that keep them."""
