"""The reference fixtures (fixtures/reference, see its README) as (output, ours, reference) pairs.

Our models, loaded through the converter, run on the fixtures' inputs; each output is paired
with the number the papers' code produced. tests/test_golden.py asserts every pair on the
CPU with the fixtures' own tolerance; bench/gpu.py scores the same pairs on a GPU in fp32
and under bf16 autocast. Keeping which outputs are compared here means both check the same
thing.

Entries come from cases.json and cases from each entry's files, so a new folder or case in
the same layout is picked up without code changes. The folder is $ENAT_REFERENCE_FIXTURES,
or ../shared/fixtures/reference next to the repository.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from enat.models.convert import config_from_reference, load_reference_checkpoint
from enat.models.enat import ENATOutput, ReuseState

_NEXT_TO_REPOSITORY = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "reference"

Pair = tuple[str, Tensor, Tensor]  # (output name, ours, reference)


def fixture_folder() -> Path:
    return Path(os.environ.get("ENAT_REFERENCE_FIXTURES", _NEXT_TO_REPOSITORY))


class ReferenceFixtures:
    """The fixtures in `folder`, with models and inputs on `device`. Outputs are cached (ENAT's
    chained steps reuse earlier ones), so use one object per precision."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        if not (folder / "cases.json").is_file():
            raise FileNotFoundError(f"no reference fixtures (cases.json) in {folder}: "
                                    f"set ENAT_REFERENCE_FIXTURES")
        self.folder, self.device = folder, torch.device(device)
        index = json.loads((folder / "cases.json").read_text())
        self.entries = {entry["name"]: entry for entry in index["entries"]}
        self.tolerance = {key: index.get("tolerance", {}).get(key, 1e-5) for key in ("rtol", "atol")}
        self._configs: dict[str, dict] = {}
        self._cases: dict[str, dict[str, Tensor]] = {}
        self._models: dict[str, nn.Module] = {}
        self._chained: dict[tuple[str, str], ENATOutput] = {}

    def config(self, name: str) -> dict:
        if name not in self._configs:
            path = self.folder / self.entries[name]["dir"] / "config.json"
            self._configs[name] = json.loads(path.read_text())
        return self._configs[name]

    def cases(self, name: str) -> dict[str, Tensor]:
        if name not in self._cases:
            loaded = load_file(self.folder / self.entries[name]["dir"] / "cases.safetensors")
            self._cases[name] = {key: value.to(self.device) for key, value in loaded.items()}
        return self._cases[name]

    def model(self, name: str) -> nn.Module:
        if name not in self._models:
            entry, config = self.entries[name], self.config(name)
            # Training-script arguments the constructor reads from `args` (ENAT's enc_dec).
            extra = {key.removeprefix("args_"): value for key, value in config.items()
                     if key.startswith("args_")}
            ours = config_from_reference(entry["kind"], config["constructor_args"], extra)
            state_dict = load_file(self.folder / entry["dir"] / "state_dict.safetensors")
            self._models[name] = load_reference_checkpoint(entry["kind"], state_dict, ours).to(self.device)
        return self._models[name]

    def case_names(self, kind: str) -> list[tuple[str, str]]:
        """(entry, case) pairs of every entry of `kind`."""
        found = []
        for name, entry in self.entries.items():
            if entry["kind"] != kind:
                continue
            if kind == "enat":
                found += [(name, case) for case in self.config(name)["cases"]]
            else:  # a case is a key prefix owning an input: "" or e.g. "nonsquare."
                inputs = ("masked_ids",) if kind == "autonat_uvit" else ("image", "code")
                found += [(name, key[: -len(suffix)]) for key in self.cases(name) for suffix in inputs
                          if key == suffix or key.endswith(f".{suffix}")]
        return found

    # -- the pairs of each kind ------------------------------------------------------------

    def enat_pairs(self, name: str, case: str, chained: bool) -> list[Pair]:
        """ENAT's outputs for `case`, its previous step either the saved reference features or
        (`chained`) our own output for that step."""
        if chained:
            output = self._enat_chained(name, case)
        else:
            output = self._run_enat(name, case, self._saved_prev(name, case))
        cases = self.cases(name)
        return [(field, getattr(output, field), cases[f"{case}.{field}"])
                for field in ("logits", "feat", "masking")]

    def _saved_prev(self, name: str, case: str) -> ReuseState | None:
        prev_case = self.config(name)["cases"][case]["prev"]
        if prev_case is None:
            return None
        cases = self.cases(name)
        return ReuseState(cases[f"{prev_case}.feat"], cases[f"{prev_case}.masking"])

    def _run_enat(self, name: str, case: str, prev: ReuseState | ENATOutput | None) -> ENATOutput:
        cases = self.cases(name)
        with torch.no_grad():
            return self.model(name)(cases[f"{case}.masked_ids"], cases[f"{case}.context"], prev)

    def _enat_chained(self, name: str, case: str) -> ENATOutput:
        if (name, case) not in self._chained:
            prev_case = self.config(name)["cases"][case]["prev"]
            prev = None if prev_case is None else self._enat_chained(name, prev_case)
            self._chained[name, case] = self._run_enat(name, case, prev)
        return self._chained[name, case]

    def uvit_pairs(self, name: str, case: str) -> list[Pair]:
        cases, model = self.cases(name), self.model(name)
        ids, labels = cases[f"{case}masked_ids"], cases[f"{case}context"]
        with torch.no_grad():
            logits = model(ids, labels)
            uncond = model(ids, torch.full_like(labels, model.config.null_class))
        pairs = [("logits", logits, cases[f"{case}logits"])]
        if f"{case}cfg.logits" in cases:
            mixed = logits + cases[f"{case}cfg.scale"] * (logits - uncond)
            pairs += [("cfg.uncond_logits", uncond, cases[f"{case}cfg.uncond_logits"]),
                      ("cfg.logits", mixed, cases[f"{case}cfg.logits"])]
        return pairs

    def vqgan_pairs(self, name: str, case: str) -> list[Pair]:
        cases, model = self.cases(name), self.model(name)
        with torch.no_grad():
            if f"{case}code" in cases:  # decode-only case
                return [("decoded", model.decode(cases[f"{case}code"]), cases[f"{case}decoded"])]
            image = cases[f"{case}image"]
            z_e = model.encoder(image)
            quantized, ids, codebook_loss, commitment_loss = model.quantize(z_e)
            # encode() must give the ids the step-by-step path gives (ours on both sides).
            pairs = [("encode", model.encode(image), ids), ("z_e", z_e, cases[f"{case}z_e"]),
                     ("token_ids", ids.reshape(ids.shape[0], -1), cases[f"{case}token_ids"])]
            if f"{case}quant" in cases:
                pairs.append(("quant", quantized, cases[f"{case}quant"]))
            if f"{case}emb_loss" in cases:  # the reference's legacy weighting
                pairs.append(("emb_loss", commitment_loss + 0.25 * codebook_loss, cases[f"{case}emb_loss"]))
            if f"{case}decoded" in cases:  # decode_code(ids), not a decode of the straight-through z
                pairs.append(("decoded", model.decode(ids), cases[f"{case}decoded"]))
        return pairs

    def all_pairs(self) -> Iterator[tuple[str, Pair]]:
        """Every pair of every entry, each named `entry-case:output` (ENAT both ways)."""
        for name, case in self.case_names("enat"):
            for chained in (False, True):
                for output, ours, reference in self.enat_pairs(name, case, chained):
                    yield f"{name}-{case}{'-chained' if chained else ''}:{output}", (output, ours, reference)
        for kind, pairs_of in (("autonat_uvit", self.uvit_pairs), ("maskgit_vqgan", self.vqgan_pairs)):
            for name, case in self.case_names(kind):
                for output, ours, reference in pairs_of(name, case):
                    yield f"{name}-{case.rstrip('.') or 'main'}:{output}", (output, ours, reference)


@dataclass
class Score:
    """Ours against the reference: floats pass within atol + rtol * |reference| (as
    torch.testing.assert_close), ids and masks when at most a given share of them differ."""

    passed: bool
    max_abs_error: float  # floats; 0 for ids and masks
    mismatch_share: float  # ids and masks; 0 for floats


def score(ours: Tensor, reference: Tensor, rtol: float, atol: float,
          id_mismatch_allowed: float = 0.0) -> Score:
    ours, reference = ours.detach().cpu(), reference.detach().cpu()
    if reference.is_floating_point():
        ours = ours.float()
        close = (ours - reference).abs() <= atol + rtol * reference.abs()
        error = float((ours - reference).abs().max()) if reference.numel() else 0.0
        return Score(bool(close.all()) and ours.shape == reference.shape, error, 0.0)
    if ours.shape != reference.shape or ours.dtype != reference.dtype:
        return Score(False, 0.0, 1.0)
    share = float((ours != reference).float().mean()) if reference.numel() else 0.0
    return Score(share <= id_mismatch_allowed, 0.0, share)
