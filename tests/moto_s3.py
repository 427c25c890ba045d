"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1, spoken to over HTTP by s3fs."""

from __future__ import annotations

import contextlib
import socket
import uuid
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3() -> Iterator[tuple[str, dict]]:
    """Yield (endpoint URL, fsspec storage options for s3fs); the server stops on exit."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}, "skip_instance_cache": True}
    try:
        yield endpoint, options
    finally:
        server.stop()


def new_bucket(options: dict) -> str:
    """Create a fresh bucket and return its name."""
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
                 aws_secret_access_key=options["secret"], region_name="us-east-1").create_bucket(Bucket=name)
    return name
