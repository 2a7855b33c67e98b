"""Golden tests: our models, loaded through the converter, against numbers produced by the
papers' reference code (fixtures/reference, see its README), on the CPU in fp32 with the
fixtures' own tolerance. Which outputs are compared lives in enat.models.golden, shared
with bench/gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from enat.models.golden import ReferenceFixtures, fixture_folder

pytestmark = pytest.mark.golden

if not (fixture_folder() / "cases.json").is_file():
    if "ENAT_REFERENCE_FIXTURES" in os.environ:
        raise FileNotFoundError(f"ENAT_REFERENCE_FIXTURES has no cases.json: {fixture_folder()}")
    pytest.skip(f"reference fixtures not found at {fixture_folder()}", allow_module_level=True)

FIXTURES = ReferenceFixtures(fixture_folder())


def assert_pairs(pairs) -> None:
    for output, ours, reference in pairs:
        if reference.is_floating_point():
            torch.testing.assert_close(ours, reference, **FIXTURES.tolerance,
                                       msg=lambda message, name=output: f"{name}: {message}")
        else:  # token ids and masks: exact
            assert ours.dtype == reference.dtype and torch.equal(ours, reference), output


def _ids(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{name}-{case or 'main'}" for name, case in pairs]


ENAT_CASES = FIXTURES.case_names("enat")
UVIT_CASES = FIXTURES.case_names("autonat_uvit")
VQGAN_CASES = FIXTURES.case_names("maskgit_vqgan")


@pytest.mark.parametrize("name,case", ENAT_CASES, ids=_ids(ENAT_CASES))
def test_enat_with_saved_prev(name: str, case: str) -> None:
    assert_pairs(FIXTURES.enat_pairs(name, case, chained=False))


@pytest.mark.parametrize("name,case", ENAT_CASES, ids=_ids(ENAT_CASES))
def test_enat_chaining_own_outputs(name: str, case: str) -> None:
    assert_pairs(FIXTURES.enat_pairs(name, case, chained=True))


@pytest.mark.parametrize("name,case", UVIT_CASES, ids=_ids(UVIT_CASES))
def test_uvit(name: str, case: str) -> None:
    assert_pairs(FIXTURES.uvit_pairs(name, case))


@pytest.mark.parametrize("name,case", VQGAN_CASES, ids=_ids(VQGAN_CASES))
def test_vqgan(name: str, case: str) -> None:
    assert_pairs(FIXTURES.vqgan_pairs(name, case))


def test_every_pair_scores_as_passing() -> None:
    """The bench's scoring agrees with the assertions above (same tolerance, same pairs)."""
    from enat.models.golden import score

    fresh = ReferenceFixtures(fixture_folder())
    scores = {label: score(ours, reference, **fresh.tolerance)
              for label, (_, ours, reference) in fresh.all_pairs()}
    assert scores and all(s.passed for s in scores.values()), [k for k, s in scores.items() if not s.passed]
