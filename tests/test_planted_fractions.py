"""C1 can fail on a planted release: planted output-predicting fractions outside the paper's band.

planted-gemma regenerated with ``semantic_fraction`` 0.05 and 0.60 (``core.testbeds.planted.generate(overrides=)``: the
same model and generator, only the fraction moves), three of its SAEs taken through the chain's lens and class stages
(``core.stages``; the classes read only the lenses) and C1's verdict computed as the claim asset does
(``core.analysis.verdicts.c1_verdicts``): both must be ``not reproduced``, the measured fraction must track the planted
one, and the control must stay near zero. The in-band case (0.25) is the chain's own planted-gemma.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from core.analysis.verdicts import c1_verdicts
from core.testbeds.planted import generate
from core.weights.discovery import discover_saes, load_sae
from core.weights.model_weights import TOKENIZER_FILE
from core.weights.vocab import vocabulary_table
from orchestration.resources import HubResource
from tests.core_chain import lens_classes

pytestmark = pytest.mark.chain

LAYERS = [0, 2, 4]
N_NULL = 512


def c1_rows(cache: Path, release: str) -> pd.DataFrame:
    """The C1 verdict rows of the release in ``cache`` (its SAEs at ``LAYERS``)."""
    hub = HubResource(cache_dir=str(cache), offline=True)
    per_feature, sensitivity = [], []
    for ref in sorted(discover_saes(release, hub.client()).saes, key=lambda r: r.layer):
        snapshot, checkpoint, sae = load_sae(ref, hub.client())
        vocabulary = vocabulary_table(snapshot.path(TOKENIZER_FILE), checkpoint.geometry.vocab_size)
        out = lens_classes(sae, checkpoint, vocabulary, ref.key, N_NULL)
        for sample in ("feature", "control"):
            per_feature.append(out.rows(sample).assign(sample=sample, layer=ref.layer))
        sensitivity.append(out.classes.sensitivity.assign(layer=ref.layer))
    return pd.DataFrame(
        c1_verdicts(pd.concat(per_feature, ignore_index=True), pd.concat(sensitivity, ignore_index=True))
    ).set_index("claim")


@pytest.mark.parametrize("fraction", [0.05, 0.60])
def test_planted_fraction_outside_the_band_is_not_reproduced(tmp_path, fraction):
    truth = generate("planted-gemma", tmp_path, layers=LAYERS, overrides={"semantic_fraction": fraction})
    assert truth.data["semantic_fraction"] == pytest.approx(fraction, abs=0.002)
    rows = c1_rows(tmp_path, "planted-gemma")
    print(f"\nplanted {fraction}:\n{rows[['verdict', 'value', 'ci_low', 'ci_high', 'control_value']]}")
    c1 = rows.loc["C1"]
    assert c1["verdict"] == "not reproduced"
    assert c1["value"] == pytest.approx(fraction, abs=0.03) and c1["control_value"] <= 0.02
    for claim in ("C1 without token identity", "C1 isotropic null"):
        assert rows.loc[claim, "verdict"] == "not reproduced", claim
    assert rows.loc["C1 paper_p75", "verdict"] == "not measured"  # a quarter by construction, whatever was planted
    assert rows.loc["C1 paper_p75", "value"] == pytest.approx(0.25, abs=0.01)
