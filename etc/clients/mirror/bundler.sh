#!/bin/sh
# Bundler against cachingproxy's RubyGems mirror (`--mirror rubygems`).
#
# Gemfiles keep `source "https://rubygems.org"`; Bundler fetches from the
# mirror instead (writes ~/.bundle/config; --local writes the project's
# .bundle/config; or set BUNDLE_MIRROR__HTTPS://RUBYGEMS__ORG/ in CI).
# Replace cache.example.lan:3128 with the proxy's name and port, and start the
# proxy with `--name cache.example.lan` so it knows that name as its own.

bundle config set --global mirror.https://rubygems.org http://cache.example.lan:3128/rubygems/
