"""Held-out perplexity of the reference answers (the SFT eval split, as training builds it)
under each numeric format: fp32, bf16, torch dynamic int8, and OpenVINO IR folders (int8/int4
weights) run through the plain OpenVINO runtime.

``python -m benchmarks.engine_research.ppl [IR_FOLDER ...]``
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch


class _Torch:
    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    @torch.inference_mode()
    def logits(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).logits.float()


class _OpenVINO:
    """The exported stateful IR, one sequence at a time (batch 1, no padding)."""

    def __init__(self, folder: Path, tokenizer) -> None:
        import openvino as ov

        self.tokenizer = tokenizer
        self.model = ov.Core().compile_model(str(folder / "openvino_model.xml"), "CPU",
                                             {"INFERENCE_NUM_THREADS": 2})  # fmt: skip
        self.inputs = {p.get_any_name() for p in self.model.inputs}

    def logits(self, ids, mask):
        import numpy as np

        assert ids.shape[0] == 1, "batch 1 only"
        req = self.model.create_infer_request()
        req.reset_state()
        n = ids.shape[1]
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
        if "beam_idx" in self.inputs:
            feed["beam_idx"] = np.zeros(1, dtype=np.int32)
        out = req.infer(feed)
        return torch.from_numpy(np.asarray(out[self.model.output(0)])).float()


def rows_and_tokenizer():
    from transformers import AutoTokenizer

    from benchmarks.engine_research.common import model_dir
    from training.sft_data import SFTConfig, build_dataset

    tok = AutoTokenizer.from_pretrained(model_dir())
    return build_dataset(SFTConfig(), tok).eval, tok


def perplexity(scorer, rows) -> float:
    from refinery.generation.scoring import answer_nll

    nll, n = answer_nll(scorer, rows, batch_size=1)
    return math.exp(nll / max(n, 1))


def main(ir_folders: list[str], kinds: list[str] | None = None) -> None:
    from benchmarks.engine_research.common import save

    torch.set_num_threads(2)
    rows, tok = rows_and_tokenizer()
    out: dict[str, float] = {"rows": len(rows)}
    if not ir_folders:
        from benchmarks.engine_research.torch_loop import load

        for kind in kinds or ("fp32", "bf16", "int8", "int8h"):
            model, _ = load(kind)
            out[kind] = perplexity(_Torch(model, tok), rows)
            print(kind, out[kind], flush=True)
    for folder in ir_folders:
        out[Path(folder).name] = perplexity(_OpenVINO(Path(folder), tok), rows)
        print(folder, out[Path(folder).name], flush=True)
    save("ppl_" + ("ov" if ir_folders else "_".join(kinds or ["all"])), out)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--kinds"]:
        main([], args[1:])
    else:
        main(args)
