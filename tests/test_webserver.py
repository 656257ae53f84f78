"""The Dagster UI as a user sees it: the webserver (on 127.0.0.1 only) serves the asset graph, the SAE
partitions and the latest materialisations with their report/plot metadata over its GraphQL API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from assets.plots import PLOTS
from core.planted import generate
from orchestration.cli import materialize_all
from orchestration.resources import ComputeResource, HubResource, StoreResource

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
KEY = "planted-gemma:layer_0/width_512/average_l0_32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.load(response)
    assert "errors" not in body, body
    return body["data"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home, data, cache = (tmp_path_factory.mktemp(n) for n in ("dagster_home", "data", "cache"))
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    generate("planted-gemma", cache, layers=[0])
    env = {**os.environ, "DAGSTER_HOME": str(home), "WEIGHTLENS_DATA_DIR": str(data), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    chain = {"hub": HubResource(cache_dir=str(cache), offline=True), "store": StoreResource(data_dir=str(data)),
             "compute": ComputeResource(device="cpu", null_directions=256, circuit_null_directions=64)}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("sae", [KEY])
        materialize_all(instance, [KEY], chain)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dagster_webserver", "-m", "orchestration.definitions", "-p", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(process.stdout.read())
                time.sleep(1)
        else:
            raise TimeoutError("dagster-webserver did not start in 120 s")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


def test_webserver_binds_loopback_only(server):
    # 0100007F is 127.0.0.1 in /proc's little-endian hex; 0.0.0.0 or :: would be every interface
    assert listening_addresses(server) == {"0100007F"}


def test_asset_graph_partitions_and_metadata_are_served(server):
    nodes = graphql(server, "{ assetNodes { assetKey { path } partitionKeys } }")["assetNodes"]
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    assert {"sae_weights", "model_weights", "lens_tables", "feature_classes", "claims_report"} <= set(by_key)
    assert KEY in by_key["lens_tables"]["partitionKeys"]
    report = graphql(server, """{ assetOrError(assetKey: {path: ["claims_report"]}) { ... on Asset {
        assetMaterializations(limit: 1) { metadataEntries { label ... on MarkdownMetadataEntry { mdStr } } } } } }""")
    entries = report["assetOrError"]["assetMaterializations"][0]["metadataEntries"]
    markdown = {e["label"]: e.get("mdStr") for e in entries}
    assert "data:image/png;base64," in markdown["planted-gemma/report"]  # the plot, inline in the UI
    assert "## Verdicts" in markdown["planted-gemma/report"] and "| C1 |" in markdown["planted-gemma/report"]
    for plot in PLOTS:  # every plot asset shows its PNG in the UI
        latest = graphql(server, """{ assetOrError(assetKey: {path: ["%s"]}) { ... on Asset {
            assetMaterializations(limit: 1) { metadataEntries { label ... on MarkdownMetadataEntry { mdStr } } } } } }""" % plot)
        entries = latest["assetOrError"]["assetMaterializations"][0]["metadataEntries"]
        shown = {e["label"]: e.get("mdStr") for e in entries}
        assert shown["planted-gemma/plot"].startswith("![planted-gemma") and "data:image/png;base64," in shown["planted-gemma/plot"]
