"""QRPOTrainer: TRL's DPOTrainer with pointwise data preparation, collator, reference log-probs and loss.

DPOTrainer's __init__ is kept whole: model loading, the reference model (separate, PEFT adapters off, or
precomputed), PEFT, DeepSpeed/FSDP preparation, the fused LM head. What QRPO changes are the four places where DPO
assumes a chosen/rejected pair: dataset preparation (quantiles and targets, computed once), the collator (one
sequence per completion), the reference log-probs (one per completion) and the loss (a pointwise regression). The
formulas live in `transforms`, `losses` and `data`; this module only wires them into TRL.
"""

from __future__ import annotations

import contextlib
import os
import textwrap

import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object, is_peft_model, tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from transformers import AutoProcessor, ProcessorMixin
from trl import DPOConfig, DPOTrainer
from trl.data_utils import extract_prompt, is_conversational
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, global_then_local_main_first, use_adapter

from . import __version__ as trl_qrpo_version
from .collator import DataCollatorForQRPO
from .columns import (
    BETA,
    BETA_LOG_Z,
    COMPLETION_IDS,
    COMPLETIONS,
    PER_COMPLETION_FLOATS,
    PROMPT,
    PROMPT_IDS,
    QUANTILE,
    SAMPLED_IDS,
    SEQUENCE_REF_LOGPS,
    REF_REWARDS,
    REWARD,
    TARGET,
)
from .config import QRPOConfig
from .data import (
    PAIRED,
    QuantileOptions,
    TargetOptions,
    alias_renames,
    check_references,
    detect_layout,
    is_reference_layout,
    fit_transform,
    kept_completion_tokens,
    map_quantiles,
    map_targets,
    shadowed_aliases,
    token_lengths,
)
from .logps import completion_labels, model_inputs, sum_completion_logps
from .losses import qrpo_loss, rebel_loss
from .metrics import spearman_correlation
from .precompute.config import BuildOffPolicyConfig
from .precompute.offpolicy import build_offpolicy_dataset
from .tokenization import check_one_format, prompt_fits, tokenize_batch
from .transforms import get_transform

logger = get_logger(__name__)


class QRPOTrainer(DPOTrainer):
    """
    Trainer for Quantile Reward Policy Optimization (QRPO), a drop-in for [`~trl.DPOTrainer`].

    QRPO ([paper](https://huggingface.co/papers/2507.08068)) regresses ``beta * log(pi/pi_ref)`` of each completion
    onto ``f(q) - beta * log Z``, where q is the completion's reward quantile among rewards of reference completions
    for its prompt, f a transform, and log Z its exact partition function. Every completion trains alone: pointwise
    data needs no pairs; paired data is used one completion at a time (both sides by default).

    The arguments are those of [`~trl.DPOTrainer`]; `args` is a [`QRPOConfig`]. The datasets are pointwise
    (`prompt`, `completion`, `reward`, `ref_rewards`) or paired (`prompt`, `chosen`, `rejected`, `chosen_reward`,
    `rejected_reward`, `ref_rewards`), plain text or conversational; docs/qrpo_trainer.md ("Expected dataset type")
    lists the aliases and precomputed quantiles. Targets are computed once, when the datasets are prepared.

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
        self._fitted_transform = None  # a per-prompt transform, fitted to the training set (Transform.fit)

        # Dataset preparation that needs no model runs now, before DPOTrainer loads any: bad data fails in seconds.
        self._rows_prepared: set[int] = set()
        if isinstance(train_dataset, Dataset):
            train_dataset = self._prepare_rows(train_dataset, args, "train")
        if isinstance(eval_dataset, Dataset):
            eval_dataset = self._prepare_rows(eval_dataset, args, "eval")
        elif isinstance(eval_dataset, dict):
            eval_dataset = {
                name: self._prepare_rows(ds, args, name) if isinstance(ds, Dataset) else ds
                for name, ds in eval_dataset.items()
            }

        # Rows that carry pi_ref's log-probabilities (from `trl qrpo generate` or `ref-logps`): training needs no
        # reference model, neither held beside the policy nor run in a precompute pass.
        if isinstance(train_dataset, Dataset) and SEQUENCE_REF_LOGPS in train_dataset.column_names:
            if ref_model is not None:
                logger.warning("The training rows carry reference log-probs: `ref_model` is not used.")
                ref_model = None
            if not args.precompute_ref_log_probs:
                logger.info("The training rows carry reference log-probs: no reference model is loaded.")
                args.precompute_ref_log_probs = True

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

    def _prepare_rows(self, dataset, args: QRPOConfig, dataset_name: str):
        """The part of dataset preparation that needs neither the model nor the tokenizer: column aliases, the
        layout, the formats, validation, quantiles and the sample selector (and the targets when they need no token
        counts). `__init__` runs it before DPOTrainer loads any model, so bad data fails in seconds."""
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        if PROMPT_IDS in columns and COMPLETION_IDS in columns and TARGET in columns:
            return dataset  # a dataset this trainer prepared already
        map_kwargs = {}
        is_map_style = isinstance(dataset, Dataset)
        if is_map_style:
            map_kwargs["num_proc"] = args.dataset_num_proc

        def desc(text):
            return {"desc": f"{text} {dataset_name} dataset"} if is_map_style else {}

        with global_then_local_main_first():
            if is_map_style:
                check_one_format(dataset)
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
            if is_reference_layout(columns):
                # The output of `trl qrpo generate` + `score`: every reference completion is a pointwise row, ranked
                # among the prompt's other references (leave-one-out), as `build-offpolicy --mode pointwise` makes.
                logger.info(
                    f"The {dataset_name} dataset holds reference completions and their rewards: training pointwise "
                    "on every one of them, each ranked among the prompt's other references (leave-one-out)."
                )
                dataset = build_offpolicy_dataset(dataset, BuildOffPolicyConfig(mode="pointwise"))
                columns = dataset.column_names
            layout = detect_layout(columns)
            if layout.kind == PAIRED and PROMPT not in columns:
                dataset = dataset.map(extract_prompt, **map_kwargs, **desc("Extracting prompt from"))
            if not layout.has_ref_rewards and args.partition_mode == "discrete" and args.num_ref_rewards is None:
                raise ValueError(
                    "partition_mode='discrete' with precomputed quantiles needs num_ref_rewards (the number of "
                    "reference rewards each quantile was computed from)."
                )
            per_prompt = self._transform.per_prompt
            targets = TargetOptions.from_args(args, self._transform)
            if per_prompt and not layout.has_ref_rewards:
                raise ValueError(
                    f"The {self._transform.name!r} transform depends on each prompt's reference rewards: the "
                    f"{dataset_name} dataset needs '{REF_REWARDS}', not precomputed quantiles."
                )
            if per_prompt and self._fitted_transform is None and not is_map_style:
                raise ValueError(
                    f"The {self._transform.name!r} transform is fitted to the training set's reference rewards "
                    "(Transform.fit), which needs a map-style Dataset (not an IterableDataset)."
                )
            if is_map_style and layout.has_ref_rewards:  # one warning per data set, naming rows
                check_references(_arrow_columns(dataset, [REF_REWARDS]), args.num_ref_rewards, dataset_name)

            # Validate, quantiles, sample selector (Arrow in, Arrow out): one row = a prompt and its k completions.
            dataset = map_quantiles(
                dataset,
                layout,
                QuantileOptions.from_args(args),
                keep_ref_rewards=per_prompt,
                warn=not is_map_style,
                # Targets that need neither token counts nor the data set's statistics come in this same pass.
                targets=targets if targets.in_quantile_pass else None,
                **map_kwargs,
                **desc("Computing quantile rewards for"),
            )
        self._rows_prepared.add(id(dataset))
        return dataset

    def _prepare_dataset(self, dataset, processing_class, args: QRPOConfig, dataset_name: str):
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        if PROMPT_IDS in columns and COMPLETION_IDS in columns and TARGET in columns:
            return dataset  # already prepared (evaluate() prepares eval sets again)
        if id(dataset) not in self._rows_prepared:  # e.g. an evaluation set passed to evaluate() later
            dataset = self._prepare_rows(dataset, args, dataset_name)

        map_kwargs = {}
        is_map_style = isinstance(dataset, Dataset)
        if is_map_style:
            map_kwargs["num_proc"] = args.dataset_num_proc

        def desc(text):
            return {"desc": f"{text} {dataset_name} dataset"} if is_map_style else {}

        per_prompt = self._transform.per_prompt
        targets = TargetOptions.from_args(args, self._transform)
        with global_then_local_main_first():
            # 2. EOS for plain-text completions, then tokenization with TRL's prompt/completion boundary rule, batched.
            first = next(iter(dataset))
            conversational = is_conversational({"prompt": first[PROMPT], "completion": first[COMPLETIONS][0]})
            dataset = dataset.map(
                tokenize_batch,
                batched=True,
                fn_kwargs={
                    "processing_class": processing_class,
                    "eos_token": None if conversational else self._tokenizer.eos_token,
                },
                remove_columns=[COMPLETIONS] + ([SAMPLED_IDS] if SAMPLED_IDS in first else []),
                **map_kwargs,
                **desc("Tokenizing"),
            )

            # 3. Rows whose prompt alone fills max_length keep no completion token: drop them, and say how many.
            if args.max_length is not None and args.truncation_mode == "keep_start":
                before = len(dataset) if is_map_style else None
                dataset = dataset.filter(
                    prompt_fits,
                    batched=True,
                    input_columns=[PROMPT_IDS],
                    fn_kwargs={"max_length": args.max_length},
                    **map_kwargs,
                    **desc("Dropping fully truncated"),
                )
                if is_map_style and len(dataset) < before:
                    logger.warning(
                        f"Dropped {before - len(dataset)} of {before} rows of the {dataset_name} dataset whose prompt "
                        f"alone fills max_length={args.max_length}: no completion token would be left to train on. "
                        "Raise max_length to keep them."
                    )
            if is_map_style and args.max_length is not None:
                self._warn_truncated(dataset, args, dataset_name)

            # 4. Targets f(q) - beta * log Z, once (unless already computed with the quantiles). A per-prompt
            # transform is fitted to the training set (the first data set prepared) and reused for evaluation sets.
            if not targets.in_quantile_pass:
                if per_prompt and self._fitted_transform is None:
                    self._fitted_transform = fit_transform(
                        self._transform, _arrow_columns(dataset, [REF_REWARDS]), args.num_ref_rewards
                    )
                if per_prompt:
                    targets = TargetOptions.from_args(args, self._fitted_transform)
                dataset = map_targets(dataset, targets, **map_kwargs, **desc("Computing QRPO targets for"))
        return dataset

    def _warn_truncated(self, dataset, args, dataset_name):
        prompt_lens, completion_lens = token_lengths(_arrow_columns(dataset, [PROMPT_IDS, COMPLETION_IDS]))
        kept = kept_completion_tokens(prompt_lens, completion_lens, args.max_length, args.truncation_mode)
        truncated = int((kept < completion_lens).sum())
        if truncated:
            logger.warning(
                f"{truncated} of {completion_lens.size} completions of the {dataset_name} dataset are cut by "
                f"max_length={args.max_length}: their log-ratio covers only the kept tokens while their target comes "
                "from the whole completion's reward. Raise max_length if this is many."
            )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [PROMPT_IDS, COMPLETION_IDS, *PER_COMPLETION_FLOATS]

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, with trl-qrpo's version listed next to TRL's under the framework versions."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            card = f.read()
        line = f"- trl-qrpo: {trl_qrpo_version}"
        if line not in card:
            lines = card.split("\n")
            at = next((i + 1 for i, text in enumerate(lines) if text.startswith("- TRL:")), None)
            if at is None:  # another template: append a framework section of our own
                lines += ["", "### Framework versions", "", line]
            else:
                lines.insert(at, line)
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(lines))

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
            _activation_checkpointing_off(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
        ):
            outputs = model(**model_inputs(inputs), labels=completion_labels(inputs), fused_lm_head=True)
        return sum_completion_logps(outputs.log_probs, inputs["completion_mask"])

    def _reference_log_probs(self, dataset, name: str, batch_size: int) -> list[list[float]]:
        """pi_ref's log-probability of every sequence of a prepared dataset, `[rows, k]`, in every process."""
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
        return torch.cat(rows).tolist()

    def _check_stored_ref_logps(self, dataset, name: str, batch_size: int) -> None:
        """Recompute the stored reference log-probs of the first `check_ref_logps` rows with the training forward
        (before the first step the policy is the reference model) and report by how much they differ."""
        count = min(self.args.check_ref_logps, len(dataset))
        if count <= 0:
            return
        subset = dataset.select(range(count))
        stored = torch.tensor(subset[SEQUENCE_REF_LOGPS], dtype=torch.float64)
        computed = torch.tensor(self._reference_log_probs(subset, name, batch_size), dtype=torch.float64)
        difference = (stored - computed).abs()
        row, side = divmod(int(difference.argmax()), difference.shape[1])
        largest = float(difference.max())
        beta = self.args.beta
        message = (
            f"Stored reference log-probs of the {name} dataset, checked on {count} rows against the training forward: "
            f"largest difference {largest:.3g} nats (row {row}, completion {side}), which moves the regression "
            f"target of beta * logratio by up to beta x {largest:.3g} = {beta * largest:.3g}."
        )
        if largest > self.args.ref_logps_tolerance:
            logger.warning(
                message + f" That is above ref_logps_tolerance={self.args.ref_logps_tolerance:g}: the log-probs were "
                "computed for other tokens, another model, or a different numeric precision (a bf16 engine). "
                "Recompute them with `trl qrpo ref-logps` (same model, max_length and dtype as training), or remove "
                "the columns to use a reference model."
            )
        else:
            logger.info(message)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Use a map-style Dataset or "
                "set `precompute_ref_log_probs=False`."
            )
        if SEQUENCE_REF_LOGPS in dataset.column_names:  # stored with the rows: no reference model is needed
            self._check_stored_ref_logps(dataset, name, batch_size)
            return dataset
        # Same cache scheme as DPO (the dataset and the model's hash), salted so DPO's pairwise cache never matches.
        fingerprint = [Hasher.hash(("qrpo-ref-sequence-logps", dataset._fingerprint, self._precompute_model_hash))]
        broadcast_object_list(fingerprint, from_process=0)
        cache_file = dataset._get_cache_file_path(fingerprint[0])
        # Unlike DPO, the cache is read only when every process sees it, and a fresh result is built from memory in
        # every process: an in-memory dataset caches in a temporary folder of each process, and nodes may not share
        # the datasets cache, so a file written by the main process is not always there for the others (DPO then
        # fails with FileNotFoundError, or waits forever when only some processes find an old cache).
        if all(gather_object([os.path.exists(cache_file)])):
            return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)
        ref_logps = self._reference_log_probs(dataset, name, batch_size)  # every row, in every process
        if self.accelerator.is_main_process:  # for later runs
            dataset.map(
                lambda _, indices: {SEQUENCE_REF_LOGPS: [ref_logps[i] for i in indices]},
                with_indices=True,
                batched=True,
                remove_columns=dataset.column_names,
                new_fingerprint=fingerprint[0],
                cache_file_name=cache_file,
                desc=f"Caching reference log probs for {name} dataset",
            )
        self.accelerator.wait_for_everyone()
        return concatenate_datasets([dataset, Dataset.from_dict({SEQUENCE_REF_LOGPS: ref_logps})], axis=1)

    # ------------------------------------------------------------------------------------------------------------
    # Loss and metrics
    # ------------------------------------------------------------------------------------------------------------

    def sequence_log_probs(self, model, inputs, **model_kwargs):
        """Policy and reference log-probabilities of each sequence of a collated batch (fp32 sums).

        Returns ``(logps, ref_logps, outputs)``; the reference comes from the batch (precomputed), the reference
        model, or the policy with its PEFT adapters off, as in DPO.
        """
        outputs = model(**model_inputs(inputs), **model_kwargs, labels=completion_labels(inputs), fused_lm_head=True)
        logps = sum_completion_logps(outputs.log_probs, inputs["completion_mask"])
        if self.precompute_ref_logps:
            ref_logps = inputs[SEQUENCE_REF_LOGPS].to(logps.device, torch.float32)
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
        beta = inputs[BETA].to(logps.device)
        if self.args.loss_type[0] == "rebel":
            side, reward = inputs["side"], inputs[REWARD].to(logratios.device)
            if not (side == 1).any() or torch.isnan(reward).any():
                raise ValueError("loss_type='rebel' needs paired data with both sides and their raw rewards.")
            losses = rebel_loss(
                logratios[side == 0], logratios[side == 1], reward[side == 0], reward[side == 1], self.args.beta
            )
        else:
            losses = qrpo_loss(
                logratios,
                inputs[TARGET],
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
                outputs = model(**model_inputs(inputs))
            return loss, outputs
        return loss

    def _log_metrics(self, mode, inputs, outputs, logps, implicit_rewards, lengths):
        gather = self.accelerator.gather_for_metrics
        target = gather(inputs[TARGET].to(implicit_rewards.device, torch.float32))
        implicit = gather(implicit_rewards.float())
        side = gather(inputs["side"].to(implicit_rewards.device))
        residual = target - implicit
        metrics = self._metrics[mode]
        metrics["target/mean"].append(target.mean().item())
        metrics["quantile/mean"].append(gather(inputs[QUANTILE].to(implicit.device)).mean().item())
        reward = gather(inputs[REWARD].to(implicit.device))
        if not torch.isnan(reward).all():
            metrics["reward/mean"].append(reward.nanmean().item())
        metrics["implicit_reward/mean"].append(implicit.mean().item())
        metrics["residual/mean"].append(residual.mean().item())
        metrics["residual/rms"].append(residual.square().mean().sqrt().item())
        metrics["beta_log_z"].append(gather(inputs[BETA_LOG_Z].to(implicit.device)).mean().item())
        metrics["logps/mean"].append(gather(logps.detach()).mean().item())
        rho = spearman_correlation(implicit, gather(lengths.to(implicit.device)).float())
        if rho is not None:
            metrics["implicit_reward/length_spearman"].append(rho)
        if (side == 1).any():  # both sides of each pair: [chosen..., rejected...] per process
            chosen, rejected = implicit[side == 0], implicit[side == 1]
            metrics["rewards/chosen"].append(chosen.mean().item())
            metrics["rewards/rejected"].append(rejected.mean().item())
            for name, index in (("chosen", 0), ("rejected", 1)):  # what each side regresses onto, and how far off
                metrics[f"target/{name}"].append(target[side == index].mean().item())
                metrics[f"residual/{name}_rms"].append(residual[side == index].square().mean().sqrt().item())
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


def _arrow_columns(dataset: Dataset, names: list[str]):
    """Whole columns of a map-style dataset as one Arrow table, in row order (zero-copy without an indices mapping)."""
    return dataset.select_columns(names).with_format("arrow")[:]


def _completions_per_row(batch) -> int:
    return int(batch["side"].max().item()) + 1


@contextlib.contextmanager
def _activation_checkpointing_off(model, checkpointing_kwargs):
    """TRL's `disable_gradient_checkpointing`, through transformers' `activation_checkpointing_*` names where they exist
    (transformers >= 5.2x warns at every use of the old `gradient_checkpointing` names: once per step here)."""
    if not hasattr(model, "activation_checkpointing_disable"):
        with disable_gradient_checkpointing(model, checkpointing_kwargs):
            yield
        return
    was_enabled = model.is_activation_checkpointing
    if was_enabled:
        model.activation_checkpointing_disable()
    try:
        yield
    finally:
        if was_enabled:
            model.activation_checkpointing_enable(checkpointing_kwargs)
