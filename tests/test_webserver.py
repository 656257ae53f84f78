"""The Dagster UI as a user sees it: the webserver (on 127.0.0.1 only) serves the asset graph, the SAE
partitions and the latest materialisations with their report/plot metadata over its GraphQL API, every asset
check with its description, each partition's SAE (layer, width, L0) in its metadata. ``served_chain`` is the
server ``tests/test_ui_browser.py`` opens in a headless browser."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from assets.common import CHECK_DESCRIPTIONS, check_specs
from assets.plots import asset_name
from core.report.plots import PLOT_FILES
from core.testbeds.planted import generate
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
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.load(response)
    assert "errors" not in body, body
    return body["data"]


@dataclass(frozen=True)
class Served:
    """A webserver over a materialised planted-gemma chain: its port, data dir and the planted truth."""

    port: int
    data: Path
    truth: dict


@contextlib.contextmanager
def served_chain(tmp_path_factory: pytest.TempPathFactory, layers: list[int]) -> Iterator[Served]:
    """planted-gemma's SAEs at ``layers`` generated, their chain and the report materialised into a fresh
    instance, then dagster-webserver serving it on a free loopback port (stopped on exit)."""
    home, data, cache = (tmp_path_factory.mktemp(n) for n in ("dagster_home", "data", "cache"))
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    truth = generate("planted-gemma", cache, layers=layers).data
    keys = [f"planted-gemma:layer_{layer}/width_512/average_l0_32" for layer in layers]
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "WEIGHTLENS_DATA_DIR": str(data),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    chain = {
        "hub": HubResource(cache_dir=str(cache), offline=True),
        "store": StoreResource(data_dir=str(data)),
        "compute": ComputeResource(device="cpu", null_directions=256, circuit_null_directions=64),
    }
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("sae", keys)
        materialize_all(instance, keys, chain)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dagster_webserver", "-m", "orchestration.definitions", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(process.stdout.read()) from None
                time.sleep(1)
        else:
            raise TimeoutError("dagster-webserver did not start in 120 s")
        yield Served(port, data, truth)
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[int]:
    """The port of a webserver over planted-gemma's layer-0 chain."""
    with served_chain(tmp_path_factory, [0]) as served:
        yield served.port


def latest_metadata(port: int, asset: str, partition: str | None = None) -> dict[str, dict]:
    """The metadata entries (label -> entry) of ``asset``'s latest materialisation (of ``partition``), as the UI
    reads them."""
    partitions = f'partitions: ["{partition}"], ' if partition else ""
    data = graphql(
        port,
        """{ assetOrError(assetKey: {path: ["%s"]}) { ... on Asset { assetMaterializations(%slimit: 1) {
        metadataEntries { label ... on MarkdownMetadataEntry { mdStr } ... on TextMetadataEntry { text }
        ... on IntMetadataEntry { intValue } ... on PathMetadataEntry { path } } } } } }"""
        % (asset, partitions),
    )
    return {e["label"]: e for e in data["assetOrError"]["assetMaterializations"][0]["metadataEntries"]}


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
    markdown = {label: e.get("mdStr") for label, e in latest_metadata(server, "claims_report").items()}
    assert "data:image/png;base64," in markdown["planted-gemma/report"]  # the plots, embedded for the UI
    assert "## Verdicts" in markdown["planted-gemma/report"] and "| C1 |" in markdown["planted-gemma/report"]
    for plot in PLOT_FILES:  # every plot asset shows its PNG in the UI
        shown = latest_metadata(server, asset_name(plot))["planted-gemma/plot"]["mdStr"]
        assert shown.startswith("![planted-gemma") and "data:image/png;base64," in shown


def test_every_asset_check_is_described(server):
    nodes = graphql(
        server,
        """{ assetNodes { assetKey { path }
        assetChecksOrError { ... on AssetChecks { checks { name description } } } } }""",
    )["assetNodes"]
    checks = {
        ("/".join(n["assetKey"]["path"]), c["name"]): c["description"]
        for n in nodes
        for c in n["assetChecksOrError"].get("checks", [])
    }
    assert checks and checks == CHECK_DESCRIPTIONS  # every check the UI lists carries its description, and only those
    with pytest.raises(KeyError, match="without a description"):
        check_specs("lens_tables", ["an_undescribed_check"])


def test_partitions_name_their_sae_and_release_tables_their_release(server):
    for asset in ("sae_weights", "model_weights", "lens_tables", "circuit_tables", "feature_classes"):
        shown = latest_metadata(server, asset, KEY)  # what the Partitions tab's detail view lists
        assert shown["sae/layer"]["intValue"] == 0 and shown["sae/sae_id"]["text"] == "layer_0/width_512/average_l0_32"
        assert (shown["sae/width"]["text"], shown["sae/l0"]["text"]) == ("512", "32")
    statistics = latest_metadata(server, "claim_statistics")
    assert all(label.startswith("planted-gemma/") for label in statistics)  # no key shared between releases
    assert {"planted-gemma/claim_verdicts/parquet", "planted-gemma/output_fraction_by_layer/rows"} <= set(statistics)
