from twisted.application.service import ServiceMaker

cachingproxy = ServiceMaker(
    "cachingproxy",
    "cachingproxy.tap",
    "A caching HTTP proxy for package downloads.",
    "cachingproxy",
)
