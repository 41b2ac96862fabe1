"""Is a leaner chunk GET than botocore worth it? boto3 get_object vs presigned URL + urllib3 readinto.

    .venv/bin/python benchmarks/get_path.py

96 objects of 4 MiB (one average chunk each) on a local SeaweedFS, 16 threads,
three alternating rounds; prints throughput and this process's CPU seconds.
"""
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import boto3, urllib3, botocore.config
from modelfs.dev.devserver import SeaweedServer

N, SIZE = 96, 4 << 20
with tempfile.TemporaryDirectory() as tmp, SeaweedServer(Path(tmp) / "s3") as srv:
    e = srv.env()
    cfg = botocore.config.Config(max_pool_connections=32, retries={"mode": "standard", "max_attempts": 5})
    c = boto3.client("s3", endpoint_url=srv.endpoint, region_name="us-east-1",
                     aws_access_key_id=e["AWS_ACCESS_KEY_ID"], aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"], config=cfg)
    c.create_bucket(Bucket="expbucket")
    blob = os.urandom(SIZE)
    for i in range(N):
        c.put_object(Bucket="expbucket", Key=f"k{i}", Body=blob)
    pool = urllib3.PoolManager(maxsize=32)

    def boto(i):
        return len(c.get_object(Bucket="expbucket", Key=f"k{i}")["Body"].read())

    def lean(i):
        url = c.generate_presigned_url("get_object", Params={"Bucket": "expbucket", "Key": f"k{i}"}, ExpiresIn=300)
        r = pool.request("GET", url, preload_content=False)
        n = int(r.headers["Content-Length"])
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = r.readinto(view[got:])
            if not k: break
            got += k
        r.release_conn()
        return got

    for name, fn in [("boto3", boto), ("lean", lean)] * 3:
        cpu, t = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(16) as ex:
            total = sum(ex.map(fn, range(N)))
        wall = time.perf_counter() - t
        print(f"{name:6s} {total/wall/1e6:7.0f} MB/s  cpu {time.process_time()-cpu:.2f} s per {total/1e6:.0f} MB", flush=True)
