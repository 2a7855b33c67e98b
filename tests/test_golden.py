"""Golden tests: our models, loaded through the converter, against numbers produced by the
papers' reference code (fixtures/reference, see its README).

Entries come from cases.json and cases from each entry's files, so a new folder or case in the
same layout is picked up without code changes. The fixture folder is $ENAT_REFERENCE_FIXTURES,
or ../shared/fixtures/reference next to the repository.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from enat.models import ENATOutput, ReuseState, config_from_reference, load_reference_checkpoint

pytestmark = pytest.mark.golden

_DEFAULT_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference"
FIXTURES = Path(os.environ.get("ENAT_REFERENCE_FIXTURES", _DEFAULT_FIXTURES))

if not (FIXTURES / "cases.json").is_file():
    if "ENAT_REFERENCE_FIXTURES" in os.environ:
        raise FileNotFoundError(f"ENAT_REFERENCE_FIXTURES has no cases.json: {FIXTURES}")
    pytest.skip(f"reference fixtures not found at {FIXTURES}", allow_module_level=True)

INDEX = json.loads((FIXTURES / "cases.json").read_text())
ENTRIES = {entry["name"]: entry for entry in INDEX["entries"]}
TOLERANCE = {key: INDEX.get("tolerance", {}).get(key, 1e-5) for key in ("rtol", "atol")}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.is_floating_point():
        torch.testing.assert_close(actual, expected, **TOLERANCE)
    else:  # token ids and masks: exact
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)


@functools.cache
def entry_config(name: str) -> dict:
    return json.loads((FIXTURES / ENTRIES[name]["dir"] / "config.json").read_text())


@functools.cache
def entry_cases(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / ENTRIES[name]["dir"] / "cases.safetensors")


@functools.cache
def entry_model(name: str) -> torch.nn.Module:
    entry, config = ENTRIES[name], entry_config(name)
    # Training-script arguments the constructor reads from `args` (ENAT's enc_dec).
    extra = {key.removeprefix("args_"): value for key, value in config.items() if key.startswith("args_")}
    our_config = config_from_reference(entry["kind"], config["constructor_args"], extra)
    state_dict = load_file(FIXTURES / entry["dir"] / "state_dict.safetensors")
    return load_reference_checkpoint(entry["kind"], state_dict, our_config)


def cases_of(kind: str) -> list[tuple[str, str]]:
    """(entry, case) pairs of every entry of `kind`."""
    found = []
    for name, entry in ENTRIES.items():
        if entry["kind"] != kind:
            continue
        if kind == "enat":
            found += [(name, case) for case in entry_config(name)["cases"]]
        else:  # a case is a key prefix owning an input: "" or e.g. "nonsquare."
            inputs = ("masked_ids",) if kind == "autonat_uvit" else ("image", "code")
            found += [
                (name, key[: -len(suffix)])
                for key in entry_cases(name)
                for suffix in inputs
                if key == suffix or key.endswith(f".{suffix}")
            ]
    return found


def _ids(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{name}-{case or 'main'}" for name, case in pairs]


# --- ENAT ------------------------------------------------------------------------------------

ENAT_CASES = cases_of("enat")


def run_enat(name: str, case: str, prev: ReuseState | ENATOutput | None) -> ENATOutput:
    cases = entry_cases(name)
    with torch.no_grad():
        return entry_model(name)(cases[f"{case}.masked_ids"], cases[f"{case}.context"], prev)


@functools.cache
def enat_chained(name: str, case: str) -> ENATOutput:
    """Our output for `case`, with the prev chain made of our own outputs."""
    prev_case = entry_config(name)["cases"][case]["prev"]
    return run_enat(name, case, None if prev_case is None else enat_chained(name, prev_case))


def check_enat_output(name: str, case: str, output: ENATOutput) -> None:
    cases = entry_cases(name)
    for field in ("logits", "feat", "masking"):
        assert_close(getattr(output, field), cases[f"{case}.{field}"])


@pytest.mark.parametrize("name,case", ENAT_CASES, ids=_ids(ENAT_CASES))
def test_enat_with_saved_prev(name: str, case: str) -> None:
    cases, prev_case = entry_cases(name), entry_config(name)["cases"][case]["prev"]
    prev = None
    if prev_case is not None:
        prev = ReuseState(cases[f"{prev_case}.feat"], cases[f"{prev_case}.masking"])
    check_enat_output(name, case, run_enat(name, case, prev))


@pytest.mark.parametrize("name,case", ENAT_CASES, ids=_ids(ENAT_CASES))
def test_enat_chaining_own_outputs(name: str, case: str) -> None:
    check_enat_output(name, case, enat_chained(name, case))


# --- AutoNAT U-ViT ---------------------------------------------------------------------------

UVIT_CASES = cases_of("autonat_uvit")


@pytest.mark.parametrize("name,case", UVIT_CASES, ids=_ids(UVIT_CASES))
def test_uvit(name: str, case: str) -> None:
    cases, model = entry_cases(name), entry_model(name)
    ids, labels = cases[f"{case}masked_ids"], cases[f"{case}context"]
    with torch.no_grad():
        logits = model(ids, labels)
        uncond = model(ids, torch.full_like(labels, model.config.null_class))
    assert_close(logits, cases[f"{case}logits"])
    if f"{case}cfg.logits" in cases:
        scale = cases[f"{case}cfg.scale"]
        assert_close(uncond, cases[f"{case}cfg.uncond_logits"])
        assert_close(logits + scale * (logits - uncond), cases[f"{case}cfg.logits"])


# --- MaskGIT VQGAN ---------------------------------------------------------------------------

VQGAN_CASES = cases_of("maskgit_vqgan")


@pytest.mark.parametrize("name,case", VQGAN_CASES, ids=_ids(VQGAN_CASES))
def test_vqgan(name: str, case: str) -> None:
    cases, model = entry_cases(name), entry_model(name)
    with torch.no_grad():
        if f"{case}code" in cases:  # decode-only case
            assert_close(model.decode(cases[f"{case}code"]), cases[f"{case}decoded"])
            return
        image = cases[f"{case}image"]
        z_e = model.encoder(image)
        quantized, ids, codebook_loss, commitment_loss = model.quantize(z_e)
        assert torch.equal(model.encode(image), ids)
        assert_close(z_e, cases[f"{case}z_e"])
        assert_close(ids.reshape(ids.shape[0], -1), cases[f"{case}token_ids"])
        if f"{case}quant" in cases:
            assert_close(quantized, cases[f"{case}quant"])
        if f"{case}emb_loss" in cases:  # the reference's legacy weighting
            assert_close(commitment_loss + 0.25 * codebook_loss, cases[f"{case}emb_loss"])
        if f"{case}decoded" in cases:  # decode_code(ids), not a decode of the straight-through z
            assert_close(model.decode(ids), cases[f"{case}decoded"])
