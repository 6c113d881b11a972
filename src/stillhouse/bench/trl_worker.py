"""TRL ``SFTTrainer`` and ``GKDTrainer`` arms of ``stillhouse bench train`` - run with the TRL virtualenv's python.

    /work/venvs/trl/bin/python trl_worker.py SPEC.json RESULT.json

This file imports only torch, transformers, datasets and trl (never stillhouse), because it runs
in the peer's own virtualenv. SPEC.json names the student directory (an HF model directory the
bench wrote), the data (JSONL of ``{"prompt": [...], "completion": [...]}`` chat messages, so TRL
computes the loss on the completion only, as ours does), batch size, learning rate, threads and
precision. RESULT.json gets the tokens (non-pad tokens TRL itself built), the steps and the wall
time from the end of the first optimizer step to the end of the last, so model loading, dataset
tokenization and the first (warm-up) step are excluded - as in the other arms.

``"mode": "gkd"`` runs ``trl.experimental.gkd.GKDTrainer`` instead (data: JSONL of ``{"messages": [...]}``,
the teacher an HF directory, ``lmbda``/``beta``/``temperature``/``max_new_tokens`` as GKDConfig's) and saves
the trained student to ``out`` for the bench to score on held-out items.
"""

from __future__ import annotations

import json
import sys
import time


def _student_and_data(spec: dict) -> tuple:
    """(tokenizer, fp32 student, dataset) of ``spec``, torch on ``spec['threads']`` threads: both arms' start."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["student"])
    model = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    return tok, model, load_dataset("json", data_files=spec["data"], split="train")


def _stamper(stamps: list[float]) -> object:
    """A TrainerCallback that appends the time at the end of every optimizer step to ``stamps``."""
    from transformers import TrainerCallback

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # TRL's callback signature
            stamps.append(time.perf_counter())

    return Stamp()


def gkd(spec: dict, result_path: str) -> None:
    """One epoch of TRL GKDTrainer; the student is saved to spec['out']."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok, model, data = _student_and_data(spec)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    stamps: list[float] = []

    cfg = GKDConfig(output_dir=spec["out"] + "-trainer", per_device_train_batch_size=spec["batch_size"],
                    num_train_epochs=1, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
                    max_length=spec["max_len"], lmbda=spec["lmbda"], beta=spec["beta"],
                    temperature=spec["temperature"], max_new_tokens=spec["max_new_tokens"],
                    bf16=spec["precision"] == "bf16", use_cpu=True, save_strategy="no", report_to=[],
                    logging_steps=10_000, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=cfg, train_dataset=data, processing_class=tok,
                         callbacks=[_stamper(stamps)])
    on_policy_at: list[int] = []  # the steps TRL drew on-policy (it calls generate_on_policy_outputs only then)
    generate = trainer.generate_on_policy_outputs

    def counted(*args, **kw):
        on_policy_at.append(len(stamps))
        return generate(*args, **kw)

    trainer.generate_on_policy_outputs = counted
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    trainer.save_model(spec["out"])
    tok.save_pretrained(spec["out"])
    steps = len(stamps)
    result = {"arm": f"trl-gkd-{spec['precision']}", "steps": steps, "examples": len(data),
              "timed_examples": len(data) * (steps - 1) / steps, "timed_s": stamps[-1] - stamps[0], "wall_s": wall,
              "model_dir": spec["out"], "on_policy_steps": len(on_policy_at), "on_policy_at": on_policy_at,
              "step_stamps": stamps, "trl_version": __import__("trl").__version__}
    with open(result_path, "w") as f:
        json.dump(result, f)


def main(spec_path: str, result_path: str) -> None:
    from trl import SFTConfig, SFTTrainer

    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("mode") == "gkd":
        gkd(spec, result_path)
        return
    tok, model, data = _student_and_data(spec)
    stamps: list[float] = []

    cfg = SFTConfig(output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], num_train_epochs=1,
                    learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
                    max_length=spec["max_len"], packing=False, completion_only_loss=True,
                    bf16=spec["precision"] == "bf16", use_cpu=True, save_strategy="no", report_to=[],
                    logging_steps=10_000, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[_stamper(stamps)])
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    trainer.train()
    steps = len(stamps)
    tokens = sum(lengths)
    result = {"arm": f"trl-{spec['precision']}", "steps": steps, "tokens": tokens,
              "timed_tokens": tokens * (steps - 1) / steps, "timed_s": stamps[-1] - stamps[0],
              "trl_version": __import__("trl").__version__}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
