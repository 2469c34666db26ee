"""Every metric name moelab logs, in one table: what a cell's MLflow run holds, what the reports and the progress lines
read, and the glossary of the docs (`GLOSSARY`). Code names a metric through these constants, never as a literal;
per-block names are built from the prefixes (`eval/moe/block<i>/<measure>`). Serves every layer, imports none."""
from __future__ import annotations

# Training, logged every log_interval steps (and at evaluations and the last step).
TRAIN_STEP = "train/step"
TRAIN_LOSS = "train/loss"
TRAIN_LM_LOSS = "train/lm_loss"
TRAIN_AUX_LOSS = "train/aux_loss"
TRAIN_LR = "train/lr"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"
TRAIN_LOSS_SCALE = "train/loss_scale"
TRAIN_SKIPPED_STEPS = "train/skipped_steps"
TRAIN_MOE = "train/moe"  # prefix: per-block balancing losses, unscaled and scaled

# Evaluation on the fixed validation windows.
EVAL = "eval"  # prefix
EVAL_LOSS = "eval/loss"
EVAL_PERPLEXITY = "eval/perplexity"
EVAL_MOE = "eval/moe"  # prefix: routing measures, mean over MoE blocks; eval/moe/block<i>/... per block
EVAL_MOE_LOAD_CV = "eval/moe/load_cv"
EVAL_MOE_UTILIZATION = "eval/moe/utilization"
EVAL_MOE_DROP_FRACTION = "eval/moe/drop_fraction"
EVAL_MOE_EXPERTS_PER_TOKEN = "eval/moe/experts_per_token"
EVAL_MOE_EXPERTS_PER_TOKEN_STD = "eval/moe/experts_per_token_std"
EVAL_MOE_ROUTER_ENTROPY_NORM = "eval/moe/router_entropy_norm"
EVAL_MOE_MEAN_TOPK_PROB = "eval/moe/mean_topk_prob"
EVAL_MOE_PURITY = "eval/moe/purity"
EVAL_MOE_DOMAIN_EXPERT_NMI = "eval/moe/domain_expert_nmi"
EVAL_MOE_REFERENCE_AGREEMENT = "eval/moe/reference_agreement"
EVAL_MOE_SATURATION = "eval/moe/saturation"
EVAL_MOE_EXPERT_FLOPS_PER_TOKEN = "eval/moe/expert_flops_per_token"
EVAL_MOE_DIFFICULTY_CORR = "eval/moe/difficulty_corr"
EVAL_MOE_DIFFICULTY_ENTROPY_CORR = "eval/moe/difficulty_entropy_corr"
EVAL_MOE_KNOB = "eval/moe/knob"

# Summary, logged once at the last step.
# Inference, measured once at a cell's end (workflows/cell/inference_cost.py)
EVAL_INFERENCE_PREFILL_TOKENS_PER_S = "eval/inference/prefill_tokens_per_s"
EVAL_INFERENCE_PEAK_MB = "eval/inference/peak_mb"
EVAL_INFERENCE_MS_PER_TOKEN = "eval/inference/ms_per_token"
SUMMARY_TOKENS_PER_S = "summary/tokens_per_s"
SUMMARY_TRAIN_SECONDS = "summary/train_seconds"
SUMMARY_FIRST_STEP_SECONDS = "summary/first_step_seconds"
SUMMARY_SETUP_SECONDS = "summary/setup_seconds"
SUMMARY_WORKER_START_SECONDS = "summary/worker_start_seconds"
SUMMARY_FINAL_SECONDS = "summary/final_seconds"
SUMMARY_EVAL_SECONDS = "summary/eval_seconds"
SUMMARY_STEP_SECONDS = "summary/step_seconds"
SUMMARY_CELL_WALL_SECONDS = "summary/cell_wall_seconds"
SUMMARY_GENERATE_SECONDS = "summary/generate_seconds"
SUMMARY_PEAK_MEMORY_MB = "summary/peak_memory_mb"
SUMMARY_PARAMS_TOTAL = "summary/params_total"
SUMMARY_PARAMS_TRAINABLE = "summary/params_trainable"
SUMMARY_CHECKPOINT_EXPERT_SHARE = "summary/checkpoint_expert_share"
SUMMARY_SKIPPED_STEPS = "summary/skipped_steps"
SUMMARY_TRAIN_GFLOPS_PER_TOKEN = "summary/train_gflops_per_token"
SUMMARY_TFLOPS_PER_DEVICE = "summary/tflops_per_device"
SUMMARY_PEAK_TFLOPS = "summary/peak_tflops"
SUMMARY_MFU = "summary/mfu"
SUMMARY_ROUTER_LATENCY_SHARE = "summary/router_latency_share"

GLOSSARY: dict[str, str] = {
    TRAIN_STEP: "optimizer step",
    TRAIN_LOSS: "LM loss + scaled auxiliary losses of the global batch (mean over ranks and micro-batches)",
    TRAIN_LM_LOSS: "next-token (or summary-token) cross-entropy of the global batch, nats",
    TRAIN_AUX_LOSS: "sum over MoE blocks of the scaled balancing and router losses",
    TRAIN_LR: "learning rate of the step (warmup, then cosine/linear decay)",
    TRAIN_TOKENS_PER_S: "tokens of the global batch per second of this step",
    TRAIN_LOSS_SCALE: "fp16 dynamic loss scale",
    TRAIN_SKIPPED_STEPS: "fp16 optimizer steps skipped on overflow so far",
    TRAIN_MOE: "prefix: train/moe/block<i>/<loss>_unscaled and _scaled per balancing loss",
    EVAL: "prefix of every evaluation metric",
    EVAL_LOSS: "cross-entropy per token over the fixed evaluation set (the whole validation budget), nats",
    EVAL_PERPLEXITY: "exp(eval/loss)",
    EVAL_MOE: "prefix: routing measures, mean over MoE blocks (eval/moe/block<i>/... per block)",
    EVAL_MOE_LOAD_CV: "coefficient of variation of routes per expert",
    EVAL_MOE_UTILIZATION: "share of experts that received at least one route",
    EVAL_MOE_DROP_FRACTION: "share of routes dropped by expert capacity",
    EVAL_MOE_EXPERTS_PER_TOKEN: "mean number of experts a token is routed to",
    EVAL_MOE_EXPERTS_PER_TOKEN_STD: "standard deviation of experts per token across tokens (0 for fixed k)",
    EVAL_MOE_ROUTER_ENTROPY_NORM: "router distribution entropy over log(E)",
    EVAL_MOE_MEAN_TOPK_PROB: "mean router probability of the selected experts",
    EVAL_MOE_PURITY: "share of an expert's routes from its dominant domain, averaged over experts (specialization)",
    EVAL_MOE_DOMAIN_EXPERT_NMI: "normalized mutual information between domain and expert",
    EVAL_MOE_REFERENCE_AGREEMENT: "agreement with the reference router's domain-to-expert assignment (Hungarian)",
    EVAL_MOE_SATURATION: "overlap of the final routing with routing at each earlier evaluation",
    EVAL_MOE_EXPERT_FLOPS_PER_TOKEN: "FLOPs of the served expert routes per token, summed over MoE blocks",
    EVAL_MOE_DIFFICULTY_CORR: "correlation of experts per token with the token's loss",
    EVAL_MOE_DIFFICULTY_ENTROPY_CORR: "correlation of experts per token with the predictive entropy",
    EVAL_MOE_KNOB: "the knob a router trained at a target compute reached (top-p's p, top-any's threshold "
                   "offset, entropy-adaptive's entropy scale; mean over MoE layers)",
    EVAL_INFERENCE_PREFILL_TOKENS_PER_S: "tokens of one evaluation micro-batch per second of a no-grad forward "
                                         "at the cell's end (median of 5)",
    EVAL_INFERENCE_PEAK_MB: "peak memory during those inference forwards alone (peak counter reset before them)",
    EVAL_INFERENCE_MS_PER_TOKEN: "milliseconds per generated token, greedy at batch 1 with a key/value cache (after a "
                                 "16-token prompt, or from the start token against a source; none for the reference "
                                 "router, which reads domain labels)",
    SUMMARY_TOKENS_PER_S: "steady-state training throughput over the run (first step excluded)",
    SUMMARY_TRAIN_SECONDS: "wall time of the training steps of this (resumed part of the) run",
    SUMMARY_FIRST_STEP_SECONDS: "wall time of the first step (compile, lazy init)",
    SUMMARY_SETUP_SECONDS: "data load + model + DeepSpeed engine + checkpoint restore",
    SUMMARY_WORKER_START_SECONDS: "from the worker process's start to the cell's function: Ray Train's worker setup "
                                  "and the imports of the cell's code (rank 0)",
    SUMMARY_FINAL_SECONDS: "after the last step's evaluation: the final cost and inference measurements, "
                           "summarization decoding, plots and artifacts",
    SUMMARY_EVAL_SECONDS: "wall time of the periodic evaluations",
    SUMMARY_STEP_SECONDS: "steady-state seconds per step",
    SUMMARY_CELL_WALL_SECONDS: "the driver's launch-to-result wall time of the cell",
    SUMMARY_GENERATE_SECONDS: "wall time of decoding the test documents (summarization)",
    SUMMARY_PEAK_MEMORY_MB: "peak resident (or device) memory of the worker",
    SUMMARY_PARAMS_TOTAL: "parameters of the model (a tied weight counts once)",
    SUMMARY_PARAMS_TRAINABLE: "parameters the optimizer updates",
    SUMMARY_CHECKPOINT_EXPERT_SHARE: "share of an MoE checkpoint's routed experts that rank 0 read while loading: "
                                     "1/ep_size where each rank reads only its own, 1 where it was loaded whole",
    SUMMARY_SKIPPED_STEPS: "fp16 optimizer steps skipped on overflow, whole run",
    SUMMARY_TRAIN_GFLOPS_PER_TOKEN: "training FLOPs per token (forward + backward), GFLOP",
    SUMMARY_TFLOPS_PER_DEVICE: "achieved training TFLOP/s per device",
    SUMMARY_PEAK_TFLOPS: "the device's measured matmul peak, TFLOP/s",
    SUMMARY_MFU: "model FLOPs utilization: achieved over peak",
    SUMMARY_ROUTER_LATENCY_SHARE: "share of a forward pass spent in the routers",
}
