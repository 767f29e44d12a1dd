"""QRPOTrainer: TRL's DPOTrainer with pointwise data preparation, collator, reference log-probs and loss.

DPOTrainer's __init__ is kept whole: model loading, the reference model (separate, PEFT adapters off, or
precomputed), PEFT, DeepSpeed/FSDP preparation, the fused LM head. What QRPO changes are the four places where DPO
assumes a chosen/rejected pair: dataset preparation (quantiles and targets, computed once), the collator (one
sequence per completion), the reference log-probs (one per completion) and the loss (a pointwise regression). The
formulas live in `transforms`, `losses` and `data`; this module only wires them into TRL.
"""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object, is_peft_model, tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from transformers import AutoProcessor, ProcessorMixin
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOConfig, DPOTrainer
from trl.data_utils import _tokenize, common_prefix_length, extract_prompt, is_conversational
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, global_then_local_main_first, pad, use_adapter

from .config import QRPOConfig
from .data import (
    PAIRED,
    alias_renames,
    shadowed_aliases,
    detect_layout,
    effective_completion_length,
    quantile_batch,
    target_batch,
)
from .losses import qrpo_loss, rebel_loss
from .metrics import spearman_correlation
from .transforms import get_transform

logger = get_logger(__name__)

# Float fields the collator carries, one value per completion.
_PER_COMPLETION_FLOATS = ("target", "beta", "beta_log_z", "quantile", "reward", "ref_logps")


@dataclass
class DataCollatorForQRPO(DataCollatorMixin):
    """
    Collator for QRPO rows: a prompt and k completions (k = 1 for pointwise data, 2 for both sides of a pair).

    Each completion becomes one sequence ``prompt + completion``, right-padded. Sequences are ordered side-major, as
    in TRL's DataCollatorForPreference: the first completion of every row, then the second, so that a paired batch
    of B rows is ``[chosen_1..chosen_B, rejected_1..rejected_B]``. Returns ``input_ids``, ``attention_mask``,
    ``completion_mask``, ``side`` (the completion's position in its row: 0 for pointwise rows and chosen, 1 for
    rejected) and, when present in the rows, the float
    fields ``target``, ``beta``, ``beta_log_z``, ``quantile``, ``reward`` and ``ref_logps``, one value per sequence.

    Args:
        pad_token_id (`int`): token used for padding.
        max_length (`int`, *optional*): truncate each prompt + completion to this many tokens.
        truncation_mode (`str`, defaults to `"keep_start"`): `"keep_start"` or `"keep_end"` (deprecated in TRL).
        pad_to_multiple_of (`int`, *optional*): pad the sequence length to a multiple of this value.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(
                f"Unsupported truncation mode: {self.truncation_mode}, expected 'keep_start' or 'keep_end'"
            )
        k = len(examples[0]["completion_ids"])
        ids, completion_masks = [], []
        for j in range(k):
            for example in examples:
                prompt, completion = example["prompt_ids"], example["completion_ids"][j]
                seq = prompt + completion
                mask = [0] * len(prompt) + [1] * len(completion)
                if self.max_length is not None:
                    sl = (
                        slice(None, self.max_length)
                        if self.truncation_mode == "keep_start"
                        else slice(-self.max_length, None)
                    )
                    seq, mask = seq[sl], mask[sl]
                ids.append(torch.tensor(seq, dtype=torch.long))
                completion_masks.append(torch.tensor(mask, dtype=torch.long))
        kwargs = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        output = {
            "input_ids": pad(ids, padding_value=self.pad_token_id, **kwargs),
            "attention_mask": pad([torch.ones_like(x) for x in ids], padding_value=0, **kwargs),
            "completion_mask": pad(completion_masks, padding_value=0, **kwargs),
        }
        output["side"] = torch.arange(k).repeat_interleave(len(examples))
        for key in _PER_COMPLETION_FLOATS:
            if key in examples[0]:
                values = [example[key][j] for j in range(k) for example in examples]
                output[key] = torch.tensor([np.nan if v is None else v for v in values], dtype=torch.float32)
        return output


class QRPOTrainer(DPOTrainer):
    """
    Trainer for Quantile Reward Policy Optimization (QRPO), a drop-in for [`~trl.DPOTrainer`].

    QRPO ([paper](https://huggingface.co/papers/2507.08068)) regresses ``beta * log(pi/pi_ref)`` of each completion
    onto ``f(q) - beta * log Z``, where q is the completion's reward quantile among rewards of reference completions
    for its prompt, f a transform, and log Z its exact partition function. Every completion trains alone: pointwise
    data needs no pairs; paired data is used one completion at a time (both sides by default).

    The arguments are those of [`~trl.DPOTrainer`]; `args` is a [`QRPOConfig`]. The datasets are pointwise
    (`prompt`, `completion`, `reward`, `ref_rewards`) or paired (`prompt`, `chosen`, `rejected`, `chosen_reward`,
    `rejected_reward`, `ref_rewards`), plain text or conversational; see the README for aliases and precomputed
    quantiles. Targets are computed once, when the datasets are prepared.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from trl_qrpo import QRPOConfig, QRPOTrainer

    >>> dataset = Dataset.from_dict({
    ...     "prompt": ["The sky is"], "completion": [" blue."], "reward": [0.7], "ref_rewards": [[0.1, 0.9, 0.4]],
    ... })
    >>> trainer = QRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=QRPOConfig("out"), train_dataset=dataset)
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "qrpo"]
    _name = "QRPO"
    _paper = {
        "title": "Quantile Reward Policy Optimization: Alignment with Pointwise Regression and Exact Partition Functions",  # noqa: E501
        "id": "2507.08068",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{matrenok2025quantile,
                title        = {{Quantile Reward Policy Optimization: Alignment with Pointwise Regression and Exact Partition Functions}},
                author       = {Simon Matrenok and Skander Moalla and Caglar Gulcehre},
                year         = 2025,
                journal      = {arXiv preprint arXiv:2507.08068},
            }"""),  # noqa: E501 (the paper's title, unbroken)
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: QRPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = QRPOConfig(f"{model_name.split('/')[-1]}-QRPO")
        elif isinstance(args, DPOConfig) and not isinstance(args, QRPOConfig):
            raise TypeError(
                "QRPOTrainer needs a QRPOConfig (a DPOConfig subclass with QRPO's fields): replace DPOConfig(...) "
                "with QRPOConfig(...); the DPO fields carry over."
            )
        if train_dataset is not None:
            sample = next(iter(train_dataset))
            if "image" in sample or "images" in sample:
                raise NotImplementedError("QRPOTrainer supports text datasets; image columns were found.")

        self._transform = get_transform(args.transform, **(args.transform_kwargs or {}))
        self._ref_std_normalizer: float | None = None

        # DPO builds its pairwise collator inside __init__ and precomputes reference log-probs with it before
        # returning, so the pointwise collator must be passed in from the start.
        if data_collator is None:
            if processing_class is None:
                name = model if isinstance(model, str) else get_config_model_id(model.config)
                revision = (args.model_init_kwargs or {}).get("revision")
                processing_class = AutoProcessor.from_pretrained(
                    name, revision=revision, trust_remote_code=args.trust_remote_code
                )
            tokenizer = (
                processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
            )
            if args.pad_token is not None:
                tokenizer.pad_token = args.pad_token
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            data_collator = DataCollatorForQRPO(
                pad_token_id=tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )

        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Dataset preparation: quantiles, sides, tokenization, targets (once, vectorised per batch)
    # ------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args: QRPOConfig, dataset_name: str):
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        if "prompt_ids" in columns and "completion_ids" in columns and "target" in columns:
            return dataset  # already prepared (evaluate() prepares eval sets again)

        map_kwargs = {}
        is_map_style = isinstance(dataset, Dataset)
        if is_map_style:
            map_kwargs["num_proc"] = args.dataset_num_proc

        def desc(text):
            return {"desc": f"{text} {dataset_name} dataset"} if is_map_style else {}

        with global_then_local_main_first():
            shadowed = shadowed_aliases(columns)
            if shadowed:
                logger.warning(
                    f"The {dataset_name} dataset has both canonical reward columns and aliases of them: using "
                    + ", ".join(f"'{c}' (not '{a}')" for a, c in shadowed.items())
                    + ". Remove the alias columns to silence this."
                )
            renames = alias_renames(columns)
            if renames:
                logger.info(f"Renaming columns of the {dataset_name} dataset: {renames}")
                dataset = dataset.rename_columns(renames)
                columns = [renames.get(c, c) for c in columns]
            layout = detect_layout(columns)
            if layout.kind == PAIRED and "prompt" not in columns:
                dataset = dataset.map(extract_prompt, **map_kwargs, **desc("Extracting prompt from"))
            if not layout.has_ref_rewards and args.partition_mode == "discrete" and args.num_ref_rewards is None:
                raise ValueError(
                    "partition_mode='discrete' with precomputed quantiles needs num_ref_rewards (the number of "
                    "reference rewards each quantile was computed from)."
                )

            # 1. Validate, quantiles, sample selector: one row = a prompt and its k completions.
            consumed = [c for c in columns if c in _consumed_columns(layout)]
            dataset = dataset.map(
                quantile_batch,
                batched=True,
                with_indices=True,
                batch_size=10_000,
                remove_columns=consumed,
                fn_kwargs={
                    "layout": layout,
                    "num_ref_rewards": args.num_ref_rewards,
                    "ties": args.ties,
                    "sample_selector": args.sample_selector,
                    "self_inclusion": args.self_inclusion,
                    "seed": args.seed,
                },
                **map_kwargs,
                **desc("Computing quantile rewards for"),
            )

            # 2. EOS for plain-text completions, then tokenization with TRL's prompt/completion boundary rule.
            first = next(iter(dataset))
            conversational = is_conversational({"prompt": first["prompt"], "completion": first["completions"][0]})
            dataset = dataset.map(
                _tokenize_row,
                fn_kwargs={
                    "processing_class": processing_class,
                    "eos_token": None if conversational else self._tokenizer.eos_token,
                },
                **map_kwargs,
                **desc("Tokenizing"),
            )

            # 3. Rows whose prompt alone fills max_length keep no completion token: drop them, and say how many.
            if args.max_length is not None and args.truncation_mode == "keep_start":
                before = len(dataset) if is_map_style else None
                dataset = dataset.filter(
                    lambda ex: len(ex["prompt_ids"]) < args.max_length,
                    **map_kwargs,
                    **desc("Dropping fully truncated"),
                )
                if is_map_style and len(dataset) < before:
                    logger.warning(
                        f"Dropped {before - len(dataset)} of {before} rows of the {dataset_name} dataset whose prompt "
                        f"alone fills max_length={args.max_length}: no completion token would be left to train on. "
                        "Raise max_length to keep them."
                    )
                if is_map_style:
                    self._warn_truncated(dataset, args, dataset_name)

            # 4. Targets f(q) - beta * log Z, once.
            if self._transform.per_prompt:
                dataset = self._set_ref_std_normalizer(dataset, dataset_name)
            dataset = dataset.map(
                target_batch,
                batched=True,
                batch_size=10_000,
                fn_kwargs={
                    "transform": self._transform,
                    "beta": args.beta,
                    "partition_mode": args.partition_mode,
                    "normalize_beta_by_length": args.normalize_beta_by_length,
                    "max_length": args.max_length,
                    "truncation_mode": args.truncation_mode,
                    "ref_std_normalizer": self._ref_std_normalizer,
                },
                remove_columns=["completions", "num_refs", "in_refs", "ref_std"],
                **map_kwargs,
                **desc("Computing QRPO targets for"),
            )
        return dataset

    def _set_ref_std_normalizer(self, dataset, dataset_name):
        if not isinstance(dataset, Dataset):
            raise ValueError(
                "The scaled-normal-icdf transform normalises each prompt's reward spread by its mean over the "
                "training set, which needs a map-style Dataset (not an IterableDataset)."
            )
        if self._ref_std_normalizer is None:  # the training set comes first; evaluation sets reuse its normaliser
            stds = np.asarray(dataset["ref_std"], dtype=np.float64)
            if np.isnan(stds).any():
                raise ValueError("The scaled-normal-icdf transform needs ref_rewards, not precomputed quantiles.")
            self._ref_std_normalizer = float(stds.mean())
            if not self._ref_std_normalizer > 0:
                raise ValueError(
                    f"scaled-normal-icdf: the reference rewards of the {dataset_name} dataset have zero spread for "
                    "every prompt; use another transform or more reference completions."
                )
        return dataset

    def _warn_truncated(self, dataset, args, dataset_name):
        prompt_lens = [len(p) for p in dataset["prompt_ids"]]
        truncated = total = 0
        for p, completions in zip(prompt_lens, dataset["completion_ids"], strict=True):
            for c in completions:
                total += 1
                truncated += effective_completion_length(p, len(c), args.max_length, args.truncation_mode) < len(c)
        if truncated:
            logger.warning(
                f"{truncated} of {total} completions of the {dataset_name} dataset are cut by max_length="
                f"{args.max_length}: their log-ratio covers only the kept tokens while their target comes from the "
                "whole completion's reward. Raise max_length if this is many."
            )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", *_PER_COMPLETION_FLOATS]

    # ------------------------------------------------------------------------------------------------------------
    # Reference log-probabilities: one per completion
    # ------------------------------------------------------------------------------------------------------------

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probabilities of each sequence of a collated batch, summed over completion tokens in fp32."""
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
        ):
            outputs = model(**_model_inputs(inputs), labels=_labels(inputs), fused_lm_head=True)
        return _sequence_logps(outputs.log_probs, inputs["completion_mask"])

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Use a map-style Dataset or "
                "set `precompute_ref_log_probs=False`."
            )
        # Same cache scheme as DPO (the dataset and the model's hash), salted so DPO's pairwise cache never matches.
        fingerprint = [Hasher.hash(("qrpo-ref-logps", dataset._fingerprint, self._precompute_model_hash))]
        broadcast_object_list(fingerprint, from_process=0)
        cache_file = dataset._get_cache_file_path(fingerprint[0])
        # Unlike DPO, the cache is read only when every process sees it, and a fresh result is built from memory in
        # every process: an in-memory dataset caches in a temporary folder of each process, and nodes may not share
        # the datasets cache, so a file written by the main process is not always there for the others (DPO then
        # fails with FileNotFoundError, or waits forever when only some processes find an old cache).
        if all(gather_object([os.path.exists(cache_file)])):
            return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)
        loader = self.accelerator.prepare(
            DataLoader(
                dataset,
                batch_size=batch_size,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
                shuffle=False,
            )
        )
        # Before `train`, DeepSpeed has not placed the model yet: an inference engine gathers ZeRO-3 shards.
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        rows = []
        for batch in tqdm(
            loader,
            desc=f"Computing reference log probs for {name} dataset",
            disable=bool(os.environ.get("TQDM_DISABLE", "")),
        ):
            logps = self.compute_ref_log_probs(model, batch)
            logps = logps.view(_completions_per_row(batch), -1).T.contiguous()  # side-major sequences -> [rows, k]
            rows.append(self.accelerator.gather_for_metrics(logps).cpu())
        ref_logps = torch.cat(rows).tolist()  # every row, in every process
        if self.accelerator.is_main_process:  # for later runs
            dataset.map(
                lambda _, indices: {"ref_logps": [ref_logps[i] for i in indices]},
                with_indices=True,
                batched=True,
                remove_columns=dataset.column_names,
                new_fingerprint=fingerprint[0],
                cache_file_name=cache_file,
                desc=f"Caching reference log probs for {name} dataset",
            )
        self.accelerator.wait_for_everyone()
        return concatenate_datasets([dataset, Dataset.from_dict({"ref_logps": ref_logps})], axis=1)

    # ------------------------------------------------------------------------------------------------------------
    # Loss and metrics
    # ------------------------------------------------------------------------------------------------------------

    def sequence_log_probs(self, model, inputs, **model_kwargs):
        """Policy and reference log-probabilities of each sequence of a collated batch (fp32 sums).

        Returns ``(logps, ref_logps, outputs)``; the reference comes from the batch (precomputed), the reference
        model, or the policy with its PEFT adapters off, as in DPO.
        """
        outputs = model(**_model_inputs(inputs), **model_kwargs, labels=_labels(inputs), fused_lm_head=True)
        logps = _sequence_logps(outputs.log_probs, inputs["completion_mask"])
        if self.precompute_ref_logps:
            ref_logps = inputs["ref_logps"].to(logps.device, torch.float32)
        else:
            ref_logps = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs
            )
        return logps, ref_logps, outputs

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        logps, ref_logps, outputs = self.sequence_log_probs(model, inputs, **extra)
        logratios = logps - ref_logps
        lengths = inputs["completion_mask"][:, 1:].sum(dim=1)
        beta = inputs["beta"].to(logps.device)
        if self.args.loss_type[0] == "rebel":
            side, reward = inputs["side"], inputs["reward"].to(logratios.device)
            if not (side == 1).any() or torch.isnan(reward).any():
                raise ValueError("loss_type='rebel' needs paired data with both sides and their raw rewards.")
            losses = rebel_loss(
                logratios[side == 0], logratios[side == 1], reward[side == 0], reward[side == 1], self.args.beta
            )
        else:
            losses = qrpo_loss(
                logratios,
                inputs["target"],
                beta,
                loss_type=self.args.loss_type[0],
                completion_lengths=lengths,
                normalize_by_length=self.args.normalize_loss_by_length,
            )
        loss = losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        self._log_metrics(mode, inputs, outputs, logps, (beta * logratios).detach(), lengths)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**_model_inputs(inputs))
            return loss, outputs
        return loss

    def _log_metrics(self, mode, inputs, outputs, logps, implicit_rewards, lengths):
        gather = self.accelerator.gather_for_metrics
        target = gather(inputs["target"].to(implicit_rewards.device, torch.float32))
        implicit = gather(implicit_rewards.float())
        side = gather(inputs["side"].to(implicit_rewards.device))
        residual = target - implicit
        metrics = self._metrics[mode]
        metrics["target/mean"].append(target.mean().item())
        metrics["quantile/mean"].append(gather(inputs["quantile"].to(implicit.device)).mean().item())
        reward = gather(inputs["reward"].to(implicit.device))
        if not torch.isnan(reward).all():
            metrics["reward/mean"].append(reward.nanmean().item())
        metrics["implicit_reward/mean"].append(implicit.mean().item())
        metrics["residual/mean"].append(residual.mean().item())
        metrics["residual/rms"].append(residual.square().mean().sqrt().item())
        metrics["beta_log_z"].append(gather(inputs["beta_log_z"].to(implicit.device)).mean().item())
        metrics["logps/mean"].append(gather(logps.detach()).mean().item())
        rho = spearman_correlation(implicit, gather(lengths.to(implicit.device)).float())
        if rho is not None:
            metrics["implicit_reward/length_spearman"].append(rho)
        if (side == 1).any():  # both sides of each pair: [chosen..., rejected...] per process
            chosen, rejected = implicit[side == 0], implicit[side == 1]
            metrics["rewards/chosen"].append(chosen.mean().item())
            metrics["rewards/rejected"].append(rejected.mean().item())
            metrics["rewards/margins"].append((chosen - rejected).mean().item())
            metrics["rewards/accuracies"].append((chosen > rejected).float().mean().item())
        shift_mask = inputs["completion_mask"][:, 1:]
        seq_len = shift_mask.size(1)
        if outputs.entropy is not None:
            entropy_sum = gather((outputs.entropy[:, -seq_len:].detach() * shift_mask).sum()).sum()
            tokens = gather(shift_mask.sum()).sum()
            metrics["entropy"].append((entropy_sum / tokens.clamp(min=1)).item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]


def _consumed_columns(layout) -> set[str]:
    consumed = {"ref_rewards", *layout.sides}
    for side in layout.sides:
        consumed |= {layout.reward_column(side), layout.quantile_column(side), layout.in_refs_column(side)}
    return consumed


def _completions_per_row(batch) -> int:
    return int(batch["side"].max().item()) + 1


def _model_inputs(inputs) -> dict:
    """Only what the model takes: some models accept unknown keywords (quantile=, target=) silently."""
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}


def _labels(inputs) -> torch.Tensor:
    return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)


def _sequence_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum per-token log-probs over completion tokens in fp32 (a bf16 sum over thousands of tokens loses nats)."""
    shift_mask = completion_mask[:, 1:]
    per_token = per_token_logps[:, -shift_mask.size(1) :].float()  # prompt-learning PEFT prepends virtual tokens
    return (per_token * shift_mask).sum(dim=1)


def _tokenize_row(example, processing_class, eos_token):
    """Tokenize a prompt and its completions; the completion starts where prompt and prompt+completion diverge."""
    prompt, completions = example["prompt"], example["completions"]
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    template_kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
    if is_conversational({"prompt": prompt}):
        prompt_ids = _tokenize(processing_class, prompt, add_generation_prompt=True, **template_kwargs)["input_ids"]
        full = [_tokenize(processing_class, prompt + c, **template_kwargs)["input_ids"] for c in completions]
    else:
        if eos_token is not None:
            completions = [c if c.endswith(eos_token) else c + eos_token for c in completions]
        prompt_ids = _tokenize(processing_class, prompt)["input_ids"]
        full = [_tokenize(processing_class, prompt + c)["input_ids"] for c in completions]
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full)
    if prompt_len < len(prompt_ids):
        logger.warning_once(
            "The tokenized prompt is not a prefix of the tokenized prompt+completion (the chat template renders the "
            "prompt alone differently, or tokens merge across the boundary). The completion starts where they "
            f"diverge; this end of the prompt is left out: {processing_class.decode(prompt_ids[prompt_len:])!r}."
        )
    return {"prompt_ids": prompt_ids[:prompt_len], "completion_ids": [ids[prompt_len:] for ids in full]}
