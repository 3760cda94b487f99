from tests.e2e.conftest import fake, loopback, proxy, upstream  # noqa: F401  (the same loopback servers)
