"""Generate text from the model at the end of training (and optionally every few evaluations)."""
from __future__ import annotations

import contextlib
import json

import mlx.core as mx

from mlxgpt.callbacks.base import Callback, check_option
from mlxgpt.errors import UserError
from mlxgpt.log import log
from mlxgpt.model import cropped_prompt_warning
from mlxgpt.rundir import start_records

RECORDS = "samples.jsonl"
STATE_KEY = "sample_evals"  # in trainer.extra_state (checkpoints): a resumed run samples at the same evaluations


class SampleCallback(Callback):
    priority = 45  # before checkpointing: a checkpoint never gets ahead of its iteration's sample

    def __init__(self, prompt: str = "\n", max_new_tokens: int = 300, temperature: float = 0.8, top_k: int | None = 200,
                 every_evals: int = 0, print_at_end: bool = True):
        check_option("prompt", prompt, "str")
        check_option("max_new_tokens", max_new_tokens, "int", lambda v: v >= 0, ">= 0")
        check_option("temperature", temperature, "number", lambda v: v >= 0, ">= 0 (0 is greedy)")
        check_option("top_k", top_k, "int_or_none", lambda v: v >= 1, ">= 1 (or null)")
        check_option("every_evals", every_evals, "int", lambda v: v >= 0, ">= 0")
        check_option("print_at_end", print_at_end, "bool")
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k = temperature, top_k
        self.every_evals, self.print_at_end = every_evals, print_at_end
        self._evals = 0  # the run's evaluations so far (every_evals counts them)
        self._records_started = False  # samples.jsonl readied for this run (see start_records)
        self._drawn: tuple[int, str] | None = None  # the last sample drawn: its iteration and text

    def on_train_start(self, trainer) -> None:
        try:
            prompt_ids = trainer.tokenizer.encode_prompt(self.prompt)  # before training, not at its end
        except UserError as e:
            raise UserError(f"callbacks.sample.prompt={self.prompt!r}: {e}") from None
        cropped = cropped_prompt_warning(len(prompt_ids), trainer.model.config.block_size)
        if cropped and trainer.is_main:
            log.warning(f"{cropped} (callbacks.sample.prompt)")
        self._evals = trainer.extra_state.get(STATE_KEY, 0)
        if trainer.is_main and trainer.resumed:  # before any sample: a resumed run has no evaluation at start
            start_records(trainer.run_dir / RECORDS, trainer.iter, trainer.eval_pending)
            self._records_started = True

    def on_eval_end(self, trainer, logs) -> None:
        self._evals += 1
        trainer.extra_state[STATE_KEY] = self._evals
        if self.every_evals and self._evals % self.every_evals == 0:
            self.sample(trainer)

    def on_train_end(self, trainer, logs) -> None:
        if self.max_new_tokens > 0 and trainer.iter > 0:
            drawn_here = self._drawn is not None and self._drawn[0] == trainer.iter  # by the last evaluation
            text = self._drawn[1] if drawn_here else self.sample(trainer, stoppable=True)
            if text is None and trainer.is_main:
                log.info(f"mlxgpt: the sample after {trainer.iter} iterations was cut short by the stop")
            elif self.print_at_end and trainer.is_main:
                log.info(f"\n--- sample after {trainer.iter} iterations (prompt {self.prompt!r}) ---\n{text}\n---")

    def sample(self, trainer, stoppable: bool = False) -> str | None:
        """Generate one sample (seeded by the iteration, so it never disturbs training randomness); `stoppable`: None,
        and nothing recorded, once a stop is asked (the sample at the end of a run: training is done)."""
        tokenizer, model = trainer.tokenizer, trainer.model
        prompt_ids = tokenizer.encode_prompt(self.prompt)
        mx.random.seed(trainer.seed + trainer.iter)
        ids = []
        with contextlib.closing(model.generate(mx.array([prompt_ids]), self.max_new_tokens, top_k=self.top_k,
                                               temperature=self.temperature, vocab_size=tokenizer.vocab_size)) as drawn:
            for token in drawn:  # in eval mode, then back
                if stoppable and trainer.stop_requested():
                    return None
                ids.append(token)
        text = self.prompt + tokenizer.decode(ids)
        if trainer.is_main:
            if not self._records_started:  # a fresh run's first sample, maybe from the evaluation at start
                start_records(trainer.run_dir / RECORDS, None)
                self._records_started = True
            with open(trainer.run_dir / RECORDS, "a", encoding="utf-8") as f:
                f.write(json.dumps({"iter": trainer.iter, "prompt": self.prompt, "text": text}) + "\n")
        trainer.emit("on_sample", {"iter": trainer.iter, "prompt": self.prompt, "samples": [text]})
        self._drawn = (trainer.iter, text)
        return text
