"""Typed run settings: one dataclass per concern, and the one error that lists every problem.

Every field is a command-line flag of the same name (``--num_experts 8``, built in cli.py); its ``help`` metadata is
its documentation (``docs/configuration.md`` is checked against it). Imports nothing else of the package; each part
checks its own section and ``training/validate.py`` gathers the findings into one ConfigError.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union


def _flag(default, help: str, **kw):
    """A dataclass field whose help text documents it (CLI --help and docs/configuration.md)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _routing_flag(default, help: str):
    """A MoEConfig field that decides which experts a token goes to and with which weight: the one place a routing
    setting is declared. The rest follows from the mark (``ROUTING_FLAGS``): a resume keeps the recorded value
    unless --allow_routing_change (training/resumable.py, whose help lists them), and export says how the HF class
    treats each (hf/export_fidelity.py, ``EXPORT_OF_ROUTING_FLAG``; a test checks that every flag has an entry)."""
    return _flag(default, help, routing=True)


@dataclass
class ModelConfig:
    """Where the model comes from."""

    model_name_or_path: Optional[str] = _flag(
        None, "A dense HF causal LM (local folder or hub id). Its weights are loaded and its FFNs upcycled into experts. "
        "A local folder of an HF MoE class (DeepSeek-V3, Qwen3-MoE, Mixtral, GPT-OSS, an export of a run, ...) is "
        "continued in place instead: its own class, routers and experts (see docs/models.md).")
    model_config: Optional[str] = _flag(
        None, "Train from scratch from a config: a built-in preset name (tiny-llama, tiny-mistral, tiny-qwen2, tiny-qwen3, tiny-gpt2; see moe_models/models/source.py) or a config.json "
        "path. Used when --model_name_or_path is not given; defaults to the 'tiny-llama' preset.")
    tokenizer_name: Optional[str] = _flag(
        None, "Tokenizer to use instead of the model's own. Fresh models without one get the built-in byte-level "
        "tokenizer, saved with the outputs.")


@dataclass
class DataConfig:
    """What the model reads."""

    train_file: Optional[str] = _flag(
        None, "Training text: .txt, .json/.jsonl, .parquet or .csv files, formats mixed. Several files and shell globs "
        "separated by commas (data/*.jsonl,extra.txt); every entry must name an existing file. name=path (or "
        "name=glob) makes every text of those files belong to domain `name` (code=src/*.jsonl,prose=books.txt), "
        "giving per-token domain_ids. Without it (and without --dataset_name) the built-in synthetic corpus is used "
        "(docs/data.md).")
    validation_file: Optional[str] = _flag(
        None, "Evaluation text, same formats and syntax as --train_file. Without it a held-out part of the training "
        "data is used (--validation_split_percentage; with --streaming, --streaming_validation_texts).")
    dataset_name: Optional[str] = _flag(None, "A dataset on the HF hub (needs network access).")
    dataset_config_name: Optional[str] = _flag(None, "The hub dataset's configuration name.")
    text_column: str = _flag("text", "Column that holds the text (ignored for .txt files).")
    block_size: int = _flag(128, "Tokens per training sequence; documents are concatenated and cut into blocks.")
    validation_split_percentage: int = _flag(5, "Percent of the training data held out for eval when there is no "
                                             "validation file or split.")
    synthetic_examples: int = _flag(20000, "Number of examples the built-in synthetic multi-domain corpus generates.")
    synthetic_domains: Optional[str] = _flag(
        None, "Comma-separated domains the built-in corpus generates, in this order (default: all eight: "
        "arithmetic,sorting,brackets,kv_recall,prose,geography,biography,chemistry). The five rule domains alone are "
        "the corpus as it was before the fact domains were added: a run made then resumes exactly with them.")
    preprocessing_num_workers: Optional[int] = _flag(None, "Processes for tokenisation (datasets.map num_proc).")
    domains: Optional[str] = _flag(
        None, "Comma-separated domain names whose positions are the per-token domain_ids (texts of any other domain "
        "get -1). Default: the built-in corpus's domains, else the names of per-domain files in the order given, then "
        "the sorted values of a `domain` column. With --streaming a `domain` column needs this list. The list a run "
        "used is saved in run_config.json (resolved.domains).")
    streaming: bool = _flag(
        False, "Read --train_file (or --dataset_name) as a stream instead of tokenising it all first: each rank reads "
        "its own share (whole files when their number is a multiple of the ranks, else every N-th text), tokenises "
        "and packs it on the fly, and a checkpoint saves each rank's place in it, so that a resume reads exactly the "
        "batches the run would have read (docs/data.md). Not for the built-in corpus.")
    shuffle_buffer_size: int = _flag(
        10000, "With --streaming: texts held in the shuffle buffer; each epoch shuffles the file order and the "
        "buffer with a generator seeded from --seed and the epoch. 0 = no shuffle: the files' order, every epoch.")
    streaming_validation_texts: int = _flag(
        1000, "With --streaming and no --validation_file: the eval texts, the first N of the hub dataset's validation "
        "split if it has one, else the first N texts of the training data in the order given, which are then held "
        "out (never trained on). Tokenised once at the start.")
    chat_template: Optional[str] = _flag(
        None, "A Jinja chat template file that renders the conversations of a `messages` column (and conversational "
        "prompt/completion pairs), over the tokenizer's own. A tokenizer without a template needs it for such data. "
        "A template with generation blocks (Jinja tags `generation` ... `endgeneration`) marks the assistant tokens "
        "itself (docs/data.md).")
    loss_on_all_tokens: bool = _flag(
        False, "Conversational and prompt/completion data: train on every token. false (the default) = the loss is on "
        "the assistant turns (or completions) only; the other tokens get label -100, in training and eval.")
    packing: bool = _flag(
        True, "Conversational and prompt/completion data: pack whole sequences into blocks of --block_size, with "
        "position ids restarting per sequence so that attention stays within each; false = one sequence per row, "
        "padded to --block_size, the padding masked. Text data is always concatenated and cut into blocks.")
    overlong_sequences: Literal["truncate", "drop"] = _flag(
        "truncate", "Conversational and prompt/completion data: what happens to a sequence longer than --block_size: "
        "truncate (its first --block_size tokens are kept) or drop (left out). The run says how many.")
    data_cache_dir: Optional[str] = _flag(
        None, "Where packed training and eval blocks are cached by content (the files' bytes, the tokenizer, block_size, "
        "the text column, the domains and the packing code), so that a second run on the same data skips tokenising. "
        "Default: $MOE_MODELS_DATA_CACHE, else ~/.cache/moe_models/data. Delete the folder to clear it.")


@dataclass
class MoEConfig:
    """How dense FFNs become DeepSpeed MoE layers (names follow deepspeed.moe.layer.MoE)."""

    num_experts: Union[int, list[int]] = _flag(
        8, "Experts per MoE layer; several values give one count per MoE layer (pyramid MoE).")
    top_k: int = _flag(2, "Experts each token is routed to (DeepSpeed's k).")
    ep_size: int = _flag(1, "Expert-parallel size: ranks that share one copy of the experts; each rank holds "
                         "num_experts / ep_size experts per layer.")
    dispatcher: Literal["per_route", "node_once"] = _flag(
        "per_route", "How routes travel to experts on other ranks (ep_size > 1; --moe_impl grouped). per_route: one "
        "row per route, so a token with k experts on another node crosses to it k times. node_once: a token crosses "
        "to each other node once, to the rank of that node with its local index, which sends it on to its experts "
        "there and returns one row, their outputs weighed and summed; more collectives per layer, so it pays where "
        "tokens have several experts per other node: many nodes' worth of fine-grained experts, node-limited routing "
        "(--max_groups_per_token), a slow link between nodes (docs/multi-node.md). Same results; needs ep_size a "
        "multiple of the ranks per node once it spans nodes; within one node it is per_route.")
    moe_layers: Union[str, list[int]] = _flag(
        "all", "Which transformer blocks get an MoE FFN: 'all', 'every:N' (blocks N-1, 2N-1, ...), or block indices "
        "such as '1,3,5'; 'none' trains the dense model as it is, with no MoE layer (the dense control of a "
        "comparison; the MoE settings are then unused, and export refuses it: it is not an MoE model).")
    capacity_factor: float = _routing_flag(1.0, "Training capacity per expert, as a multiple of the even share of tokens.")
    eval_capacity_factor: float = _routing_flag(1.0, "Capacity factor in eval mode.")
    min_capacity: int = _routing_flag(4, "Minimum tokens an expert can take, whatever the capacity factor.")
    drop_tokens: bool = _routing_flag(False, "Drop tokens above an expert's capacity (--capacity_factor). false (the "
                              "default) = dropless: every token reaches its experts (capacity grows to the busiest "
                              "expert), as the HF MoE classes route, so an export is exact.")
    noisy_gate_policy: Optional[Literal["Jitter", "RSample"]] = _routing_flag(
        None, "Noise on the router during training: Jitter (multiplicative on the input) or RSample (Gumbel).")
    use_rts: bool = _routing_flag(True, "Random token selection when dropping (top-1 only).")
    top2_2nd_expert_sampling: bool = _routing_flag(
        False, "Top-2 only: pick the second expert with Gumbel noise (DeepSpeed's default, which it applies in eval "
        "too); false (the default here) = deterministic top-2, as the HF MoE classes route.")
    use_residual: bool = _flag(False, "Residual MoE: keep the dense FFN beside the experts and mix the two.")
    benchmark_balanced_routing: bool = _routing_flag(
        False, "For throughput benchmarks only: the router is computed as usual, but token t's k routes go to experts "
        "(t k + j) mod E, so every expert gets an even share; the model does not learn to route. Marked in "
        "run_config.json and in every training row (moe/layer_i/forced_balanced_routing); dropless, --moe_impl "
        "grouped only (docs/performance.md).")
    num_shared_experts: int = _flag(
        0, "Shared experts (DeepSeekMoE, Qwen2-MoE): N always-on FFNs beside the routed experts in every MoE layer, "
        "held as one FFN of the dense family's class N routed experts wide (with granular experts N must be a "
        "multiple of granularity) and added to the routed output of every token. Upcycled as copies of the dense FFN "
        "(--expert_init copy/copy_noise; the output projections are scaled so that the layer still computes the dense "
        "FFN at step 0 for top_k >= 2; exact copies get equal gradients and stay equal, so use copy_noise for N > 1), "
        "fresh with --expert_init random. Data-parallel parameters, not expert-parallel ones. 0 = off "
        "(docs/routing.md; export: docs/export.md).")
    shared_expert_gate: bool = _flag(
        False, "Needs --num_shared_experts >= 1: scale the shared experts' output per token by sigmoid(w . x), one "
        "learned vector w per MoE layer starting at 0 (a factor of 1/2), as Qwen2-MoE does.")
    moe_impl: Literal["deepspeed", "grouped"] = _flag(
        "grouped", "Expert implementation inside the DeepSpeed MoE layer: 'deepspeed' = the stock layer as is; "
        "'grouped' = tokens sorted by expert with index operations and all local experts as one grouped GEMM "
        "(gated and plain FFNs with or without biases and fused gate_up projections, weights held stacked; FFNs no "
        "grouped form expresses run their experts one by one, which the run says once), dropless without host syncs "
        "at ep_size 1. Same checkpoint files and names, so a checkpoint's weights load into either (the optimizer "
        "state needs --reset_optimizer; docs/architecture.md; speed: docs/performance.md).")
    prove_conversion: bool = _flag(
        True, "Before converting, check on a small probe model of the same family (the model's config with small "
        "sizes; no weights of the model are copied) that the conversion, with copied experts and no dropped tokens, "
        "reproduces the dense model's logits, and refuse the conversion with what was found when it does not "
        "(docs/models.md). Costs well under a second, once per config. false = convert without the check.")
    aux_loss_coef: float = _flag(0.01, "Weight of the load-balancing loss added to the LM loss.")
    router_z_loss_coef: float = _flag(
        0.0, "Weight of the router z-loss (ST-MoE): per MoE layer the mean over tokens of logsumexp(router logits)^2, "
        "summed over layers and added to the loss; it keeps router logits small (docs/routing.md). 0 = off; it is "
        "logged per layer either way.")
    score_function: Literal["softmax", "sigmoid"] = _routing_flag(
        "softmax", "How router logits become expert scores: softmax over the experts, or an independent sigmoid per "
        "expert (DeepSeek-V3). Any setting of this or the four options below other than its default routes by "
        "deterministic top-k of the scores (docs/routing.md); --moe_impl grouped only.")
    norm_topk_prob: Optional[bool] = _routing_flag(
        None, "Rescale each token's chosen scores to sum to 1 (true) or keep them as they are (false). None = "
        "DeepSpeed's rule: top-1 keeps its probability, top-2 and more rescale.")
    routed_scaling_factor: float = _routing_flag(
        1.0, "Multiply the routed experts' combine weights by this (DeepSeek-V3 uses 2.5 with sigmoid scores).")
    router_bias_update_rate: float = _routing_flag(
        0.0, "Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for the choice of experts "
        "only; after each optimizer step bias_e += rate x sign(mean load - load_e), the load counted over every token "
        "of the step on all ranks. 0 = off; 1e-3 is the published rate. With it, --aux_loss_coef 0 is supported.")
    expert_groups: int = _routing_flag(
        1, "Group-limited routing (DeepSeek-V3's node-limited routing): the experts of each MoE layer in this many "
        "equal groups, of consecutive expert ids; with --max_groups_per_token a token chooses its experts inside its "
        "best groups only. Groups of the experts of one node bound the nodes a token's routes reach: experts / "
        "(ep_size / devices per node) per group (docs/routing.md).")
    max_groups_per_token: Optional[int] = _routing_flag(
        None, "With --expert_groups: M, the groups a token may route into; it takes the M groups with the highest sum "
        "of their two best scores (plus the aux-loss-free bias), then its top-k experts inside them. None = every "
        "group (no limit).")
    num_null_experts: int = _flag(
        0, "Null (zero-computation) experts (MoE++, LongCat-Flash): N more router outputs whose expert output is zero; "
        "a route to one is not dispatched and costs nothing, so a token that chooses one runs fewer real experts. The "
        "router weight gets N more rows (E + N); null experts are counted as experts by the balance loss and live on no "
        "rank. 0 = off; --moe_impl grouped only (docs/routing.md).")
    null_expert_output: Literal["zero", "identity"] = _flag(
        "zero", "With --num_null_experts: what a null expert outputs. zero: nothing (MoE++'s zero experts); identity: "
        "the token's input, weighted by the route's weight (MoE++'s copy experts, LongCat-Flash's zero-computation "
        "experts). Either costs no expert FLOPs.")
    null_expert_target_real_k: Optional[float] = _routing_flag(
        None, "With --num_null_experts and --router_bias_update_rate: the compute target, the mean number of real "
        "experts per token (between top_k - num_null_experts and top_k, exclusive of top_k). After each optimizer step "
        "the aux-loss-free update moves every bias toward its share of the routes: a real expert's share is "
        "target / (top_k E), a null expert's (1 - target / top_k) / N (LongCat-Flash's controller, in DeepSeek-V3's "
        "sign form). None = the bias balances the real experts only and the null biases stay.")
    top_p: Optional[float] = _routing_flag(
        None, "Top-p (dynamic-k) routing (Huang et al. 2024): each token takes the fewest experts, by descending "
        "score, whose router probabilities sum to >= p, at least --min_k and at most --top_k; the weights are rescaled "
        "over the kept ones (unless --norm_topk_prob false). Routes past the cut are not dispatched. Softmax scores and "
        "--aux_loss_type micro_batch only. None = off (docs/routing.md).")
    min_k: int = _routing_flag(1, "With --top_p: the fewest experts a token takes (the most is --top_k).")
    dynamic_loss_coef: float = _flag(
        0.0, "Weight of the dynamic loss (Huang et al. 2024): per MoE layer the mean over tokens of the entropy (nats) "
        "of the router's softmax distribution, added to the loss; it keeps a top-p router from spreading its "
        "probability to buy experts. 0 = off (1e-4 in the paper).")
    aux_loss_type: Literal["micro_batch", "sequence", "global_batch"] = _flag(
        "micro_batch", "Over which tokens the balance loss counts expert frequencies: each micro-batch (DeepSpeed's), "
        "each sequence averaged (DeepSeek-V2/V3), or the whole optimizer step on all data-parallel ranks (Qwen's "
        "global-batch loss; one all-reduce of E counts per micro-step).")
    expert_init: Literal["copy", "copy_noise", "random", "granular", "drop"] = _flag(
        "copy", "How experts start: copies of the dense FFN (sparse upcycling), copies plus noise, fresh random "
        "weights, 'granular' (fine-grained experts: each holds 1/granularity of the dense FFN's hidden units, "
        "scaled so that the model starts as the dense one) or 'drop' (Drop-Upcycling: copies with reinit_ratio of "
        "each expert's hidden units re-drawn). The router always starts fresh (for granular, one row per group of "
        "granularity experts). docs/upcycling.md.")
    expert_noise_std: float = _flag(0.01, "For expert_init=copy_noise: noise std relative to each weight's std.")
    granularity: int = _flag(
        1, "For expert_init=granular: G, the number of slices the dense FFN's F hidden units are cut into. Each expert "
        "holds F/G units (slice e mod G for expert e) with its output projection scaled by G; G must divide F and "
        "num_experts. top_k counts these fine-grained experts (it is not multiplied by G): with top_k a multiple of G "
        "(and >= 2), --drop_tokens false and, for top_k 2, --top2_2nd_expert_sampling false, the model starts as "
        "exactly the dense model's function.")
    reinit_ratio: float = _flag(
        0.5, "For expert_init=drop: the fraction r of each expert's hidden units re-drawn (round(r x F) units chosen "
        "per expert by its own seed; their gate/up rows and down columns drawn from a normal with the mean and std "
        "of the dense weight matrix). 0 = copies, 1 = every unit re-drawn.")

    def __post_init__(self):
        if isinstance(self.num_experts, list) and len(self.num_experts) == 1:
            self.num_experts = self.num_experts[0]


ROUTING_FLAGS = tuple(f.name for f in dataclasses.fields(MoEConfig) if f.metadata.get("routing"))


@dataclass
class TrainConfig:
    """The training loop, its schedule and its outputs."""

    output_dir: str = _flag("outputs/run", "Where metrics.jsonl, run_config.json, the tokenizer and checkpoints/ go.")
    overwrite_output_dir: bool = _flag(False, "Allow writing into an output_dir that already holds a run.")
    deepspeed: str = _flag("zero1", "DeepSpeed JSON config: a path, or a name in moe_models/training/ds_configs/ (zero0, zero1, zero2). "
                           "Values set to \"auto\" are filled from the flags below.")
    per_device_train_batch_size: int = _flag(8, "Sequences per rank per micro-step.")
    per_device_eval_batch_size: int = _flag(8, "Sequences per rank per eval step.")
    gradient_accumulation_steps: int = _flag(1, "Micro-steps per optimizer step.")
    learning_rate: float = _flag(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _flag(0.1, "AdamW weight decay (not applied to biases and norms).")
    warmup_steps: int = _flag(10, "Linear warmup steps (from 0) before the cosine decay; at least 1.")
    min_lr_ratio: float = _flag(0.1, "The cosine decay ends at learning_rate * min_lr_ratio.")
    max_steps: int = _flag(300, "Optimizer steps to train for.")
    max_grad_norm: float = _flag(1.0, "Gradient clipping norm (0 disables).")
    seed: int = _flag(42, "Seed for model init, data order and the synthetic corpus.")
    logging_steps: int = _flag(10, "Log training metrics every N steps.")
    eval_steps: int = _flag(100, "Evaluate every N steps (and at the end); 0 = only at the end.")
    max_eval_batches: int = _flag(20, "Cap on eval batches per rank per evaluation (0 = the whole eval set).")
    save_steps: int = _flag(0, "Save a DeepSpeed checkpoint every N steps; 0 = only at the end (and on SIGTERM/SIGUSR1).")
    save_total_limit: int = _flag(0, "Keep only the newest N checkpoints (never the one `latest` names); 0 = keep all.")
    resume_from_checkpoint: Optional[str] = _flag(
        None, "Continue a run: 'latest' (this output_dir's newest checkpoint; starts fresh if there is none, so "
        "a requeued job can always pass it), a checkpoints folder, or one tag folder (checkpoints/global_stepN).")
    upcycle_from_checkpoint: Optional[str] = _flag(
        None, "Start by upcycling a dense run in the middle of its schedule: a checkpoint tag folder (or a checkpoints "
        "folder: its latest) of a run with --moe_layers none and the same model. Its weights are the dense model that "
        "surgery converts (--expert_init), and this run continues that run at its step N: the same LR schedule, data "
        "position and RNG state, with a fresh optimizer state. The first eval is at step N, before any update. Used "
        "only at a fresh start: once this run has checkpoints, --resume_from_checkpoint latest continues its own "
        "(docs/payoff.md).")
    reset_optimizer: bool = _flag(False, "When resuming at another world size, ep_size or moe_impl: load the weights "
                                  "and start a fresh optimizer state (the LR schedule continues).")
    allow_routing_change: bool = _flag(
        False, f"When resuming: allow routing settings other than those the checkpoint's run recorded "
        f"({', '.join(ROUTING_FLAGS)}). Without it a routing flag given with another value is refused, and one left "
        "out takes the run's recorded value.")
    max_nonfinite_steps: int = _flag(
        10, "Stop (exit 1) after this many consecutive optimizer steps whose loss or gradient norm is NaN or inf. Each "
        "such step is skipped on every rank and counted in metrics.jsonl (`nonfinite_steps`); 0 = never stop.")
    dist_timeout_s: int = _flag(
        600, "Seconds any collective (all-reduce, all-to-all, barrier) may wait for the other ranks before the run "
             "stops with an error naming it: a frozen rank or a node that stopped answering ends the job instead of "
             "hanging it. Data preparation on rank 0 (the others wait for its cache) has a timeout of its own.")
    gradient_checkpointing: bool = _flag(
        False, "Activation checkpointing (transformers' own, per decoder block, non-reentrant): keep only each block's "
        "input and recompute its activations in the backward pass; less memory for about one more forward of time. "
        "Routes are counted once, not again when recomputed (docs/performance.md).")
    compile: bool = _flag(
        False, "torch.compile each decoder block for training, as torchtitan does (the block's own compile(), so "
        "state-dict keys, checkpoints and export are unchanged). The first steps take the compile (tens of seconds "
        "per block shape); losses match eager to bf16's precision. The grouped experts need bf16 (torch's compiler "
        "kernel of grouped GEMMs takes bf16 only); refused with the reason where it cannot work "
        "(docs/performance.md#torchcompile).")
    plan: bool = _flag(
        False, "Print the preflight plan and exit: parameters, bytes per rank of weights, gradients, optimizer states "
        "and activations under these settings, all-to-all bytes and FLOPs; writes plan.json to output_dir. Nothing is "
        "allocated (the model is built on the meta device); works under the launcher too (docs/performance.md).")
    device_memory_gb: Optional[float] = _flag(
        None, "With --plan: the memory of one device in GiB; the plan says whether the run fits and, if not, the "
        "smallest change that does.")
    plan_cluster: Optional[str] = _flag(
        None, "With --plan: the machines to plan for, a preset (h100-sxm-ib400, h200-sxm-ib400, h800-ib400, "
        "a100-sxm-ib200) or a JSON file of the same fields; the plan then covers --plan_nodes of its nodes (the world "
        "is nodes x devices per node, whatever launched the plan) and predicts the step time, tokens/s and MFU, part "
        "by part (docs/multi-node.md#choosing-a-layout).")
    plan_nodes: int = _flag(1, "With --plan_cluster: how many of its nodes the run uses.")
    plan_search: bool = _flag(
        False, "With --plan_cluster: list every layout of the same run that fits a device (ep_size, ZeRO stage, "
        "micro-batch x accumulation for the same tokens per step, activation checkpointing), fastest first, and "
        "why the best one wins.")
    plan_world_size: Optional[int] = _flag(
        None, "With --plan: the number of ranks the plan is for, all nodes together (16 for 2 nodes of 8 GPUs), so "
        "that one process (a login node) plans a launch of many; default: the ranks this command was launched with "
        "(1 for python train.py).")
    disable_tqdm: bool = _flag(False, "Hide the progress bar (rank 0 shows one by default).")


@dataclass
class LogConfig:
    """Where metrics go beside metrics.jsonl, what MFU is measured against, and when a router-collapse warning is
    given (docs/metrics.md)."""

    report_to: str = _flag(
        "none", "Also log to `wandb` (Weights & Biases; offline, with the `wandb sync` command printed, when no API "
        "key is set: WANDB_API_KEY or `wandb login`), `tensorboard` (event files in output_dir/tensorboard; needs "
        "the tensorboard package: the `tensorboard` extra), or both: `wandb,tensorboard`. Rank 0 only.")
    wandb_project: Optional[str] = _flag(None, "wandb project; default WANDB_PROJECT, else 'moe-models'.")
    wandb_entity: Optional[str] = _flag(None, "wandb entity (team or user); default WANDB_ENTITY, else your default.")
    wandb_run_name: Optional[str] = _flag(None, "wandb run name; default WANDB_NAME, else a generated name.")
    wandb_tags: Optional[str] = _flag(None, "Comma-separated wandb tags; default WANDB_TAGS.")
    peak_tflops: Optional[float] = _flag(
        None, "Peak TFLOPS of one device for `mfu`. Default: the bf16 dense peak of a known GPU (docs/metrics.md); "
        "without either, `mfu` is not reported.")
    collapse_effective_experts: float = _flag(
        0.5, "Router-collapse warning: warn when an MoE layer's effective expert count, exp(entropy of its load), falls "
        "below this fraction of its experts (E when even; top_k when every token picks the same experts, so with E <= "
        "2 x top_k the default cannot fire: --collapse_imbalance_of_max and --collapse_dead_expert_share can). 0 = off "
        "(docs/metrics.md).")
    collapse_imbalance: float = _flag(
        2.5, "Router-collapse warning: warn when an MoE layer's imbalance, its busiest expert's load over the mean load, "
        "rises above this (1 is even; E / top_k is every token on the same experts). 0 = off.")
    collapse_imbalance_of_max: float = _flag(
        0.8, "Router-collapse warning: warn too when an MoE layer's imbalance is above this fraction of the way from "
        "even (1) to its maximum E / top_k, when that is below --collapse_imbalance (the case of few experts: 4 "
        "experts, top-2 warn above 1.8). 0 = off; 1 never fires.")
    collapse_dead_expert_share: float = _flag(
        0.1, "Router-collapse warning: warn when an expert of an MoE layer was routed fewer than this fraction of an "
        "even share (the mean load) in a logging interval: a dead expert, with no tokens or almost none. Fires for "
        "any number of experts and top_k. 0 = off.")
    collapse_logit_norm_intervals: int = _flag(
        5, "Router-collapse warning: warn when an MoE layer's mean router-logit norm grew in each of this many "
        "consecutive logging intervals, by a factor above --collapse_logit_norm_growth over them. 0 = off.")
    collapse_logit_norm_growth: float = _flag(
        1.5, "Router-collapse warning: the growth of the router-logit norm over --collapse_logit_norm_intervals "
        "intervals above which steady growth warns (a healthy router's norm grows slowly while it learns).")
    collapse_logit_rms: float = _flag(
        2.0, "Router-collapse warning: growing router logits warn only once their norm is above this x sqrt(E), a "
        "root-mean-square logit above this (a router that starts from small logits grows them fast while it learns).")
    collapse_min_tokens: int = _flag(
        1024, "Router-collapse warning: a logging interval is checked only when each MoE layer routed at least this "
        "many tokens in it (over all ranks): the load of a few hundred tokens swings from interval to interval by "
        "itself (launch/debug_single_gpu.sh logs every 256). 0 = every interval.")


@dataclass
class RunConfig:
    """Everything one run needs; saved as run_config.json."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # The flags the command line gave (the others are defaults): a flag given with its default value still counts
    # as given, so a conflict with what a loaded model or checkpoint holds can be told from a default. Not recorded.
    given: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTION_TYPES}

    def was_given(self, name: str) -> bool:
        return name in self.given


SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "moe": MoEConfig, "train": TrainConfig, "log": LogConfig}


class ConfigError(ValueError):
    """Raised once with every problem found, one per line, each saying how to fix it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("Invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))

