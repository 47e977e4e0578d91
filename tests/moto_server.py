"""The moto S3 server the tests run against: started by `bench.moto.moto_server`, its one home.

It lives in bench/ because the benchmarks need it too and must not import the test suite; the tests'
`s3_server` fixture (conftest.py) and the fault-proxy tests import it from here.
"""

from bench.moto import moto_server

__all__ = ["moto_server"]
