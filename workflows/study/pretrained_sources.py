"""The study checks of `hf` models, before anything launches: where each checkpoint comes from (a folder, the hub,
or a `cell:` of this study, which must exist and be exportable), what it is (read from config.json alone), and
whether each router of the study can be built on it (upcycle only on dense checkpoints, router swap only on MoE
ones)."""
from __future__ import annotations

from moe_models.models.options import moe_layers, num_experts, routing_problem
from moe_models.pretrained.architecture import Architecture
from moe_models.pretrained.source import HubCheckSkipped, cell_source, read_config, skip_hub_check
from moe_models.spec import DENSE


def source_config(study, j: int) -> dict:
    """config.json of models[j]'s checkpoint (for a cell: source, the one its export will write); ValueError when
    it cannot be had."""
    pretrained = study.models[j].resolved_options().pretrained
    source = cell_source(pretrained)
    return _cell_config(study, source) if source else read_config(pretrained)


def hf_problems(study, j: int) -> list[str]:
    """Every problem of models[j] (an `hf` entry): its source, the study's routers on it, the LoRA targets."""
    model = study.models[j]
    opts = model.resolved_options()
    try:
        config = source_config(study, j)
        arch = Architecture.from_config(config)
    except HubCheckSkipped as skipped:
        skip_hub_check(f"models[{j}].pretrained {skipped}")
        return []
    except ValueError as err:
        return [f"models[{j}].pretrained: {err}"]
    routers = [(i, r) for i, r in enumerate(study.routers) if model.crossed_with(r)]
    problems = [f"routers[{i}]: on models[{j}] ({model.display()}), {p}" for i, r in routers
                if (p := routing_problem(arch, opts, r.name == DENSE))]
    if opts.init_router == "pretrained" and arch.is_moe:
        problems.extend(f"routers[{i}]: on models[{j}] ({model.display()}), init_router: pretrained copies the "
                        f"checkpoint's linear gate, and {r.display()} has no linear scorer to copy it into; use "
                        "init_router: random, or a linear router (topk, top_p, ...)"
                        for i, r in routers if r.name != DENSE and not _has_linear_gate(r, arch))
    if opts.init_router == "pretrained" and arch.model_type == "gpt_oss":
        problems.extend(f"routers[{i}]: on models[{j}] ({model.display()}), init_router: pretrained copies GPT-OSS's "
                        "router with its learned logit bias; set router_bias: true"
                        for i, r in routers if r.name != DENSE and not getattr(r.routing_spec().options,
                                                                               "router_bias", False))
    if study.training.lora:
        problems.extend(lora_problems(study.training.lora.target_modules, config, j))
    return problems


def _has_linear_gate(router, arch: Architecture) -> bool:
    """Does this router score with one Linear(d_model, num_experts), as the checkpoint's gate does? (Built on the
    meta device: no memory, no init cost.)"""
    import torch

    from moe_models.routers import ROUTERS, RouterContext

    cls = ROUTERS.get(router.name)
    try:
        with torch.device("meta"):
            built = cls(RouterContext(arch.hidden_size, arch.num_experts, arch.vocab_size, 0, 0),
                        router.routing_spec().options)
    except Exception:  # a router that cannot even be built this way has no gate to copy into
        return False
    proj = getattr(built, "proj", None)
    return isinstance(proj, torch.nn.Linear) and tuple(proj.weight.shape) == (arch.num_experts, arch.hidden_size)


def meta_model(config: dict):
    """The checkpoint's model built from its config.json on the meta device: its modules and shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))


def model_memory(study, j: int):
    """models[j]'s estimated memory per rank (an `hf` model whose config.json can be had), or None."""
    from workflows.study.memory import checkpoint_parameters, rank_memory

    model = study.models[j]
    if model.name != "hf":
        return None
    opts = model.resolved_options()
    try:
        params = checkpoint_parameters(source_config(study, j), opts.upcycle)
    except (ValueError, HubCheckSkipped):  # reported (or named as skipped) by hf_problems
        return None
    t = study.training
    return rank_memory(params, t.precision, t.zero_stage, study.resources.workers_per_cell, opts.ep_size,
                       train_dense=t.lora is None, train_experts=t.lora is None or t.lora.train_experts)


def lora_problems(targets: list[str], config: dict, j: int) -> list[str]:
    """LoRA targets that name no linear of the checkpoint (its modules built on the meta device: no weights)."""
    import torch

    model = meta_model(config)
    linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
    return [f"training.lora.target_modules: {t!r} is no linear of models[{j}]'s checkpoint; valid: "
            f"{', '.join(linears)}" for t in targets if t not in linears]


def _cell_config(study, source) -> dict:
    from moe_models.pretrained.export import export_problem, hf_config  # builds on torch; only cell: sources

    models = {m.display(): m for m in study.models}
    routers = {r.display(): r for r in study.routers}
    if source.model_label not in models:
        raise ValueError(f"cell source model {source.model_label!r} is not a model of this study; valid: "
                         f"{', '.join(models)}")
    if source.router_label not in routers:
        raise ValueError(f"cell source router {source.router_label!r} is not a router of this study; valid: "
                         f"{', '.join(routers)}")
    model, router = models[source.model_label], routers[source.router_label]
    if not model.crossed_with(router):
        raise ValueError(f"cell source {source.model_label}/{source.router_label}: models' routers leave out "
                         f"{source.router_label!r}, so that cell does not exist")
    if model.name == "hf":
        raise ValueError(f"cell source {source.model_label}/{source.router_label}: a source is one of moelab's own "
                         "models trained from scratch, not another hf model")
    routing = router.routing_spec()
    problem = export_problem(model.name, model.resolved_options(), routing)
    if problem:
        raise ValueError(f"cell source {source.model_label}/{source.router_label}: {problem}")
    t = study.training
    vocab = min(d.vocab_size for d in study.datasets)
    return hf_config(model.resolved_options(), routing, vocab, max(t.seq_len, t.target_len))


def experts_and_moe_layers(study, j: int) -> tuple[int, int] | None:
    """(routed experts per MoE layer, MoE layers) of models[j], or None when its source cannot be read."""
    model = study.models[j]
    opts = model.resolved_options()
    if model.name != "hf":
        return opts.num_experts, opts.moe_blocks()
    try:
        arch = Architecture.from_config(source_config(study, j))
    except (ValueError, HubCheckSkipped):  # reported (or named as skipped) by hf_problems
        return None
    return num_experts(arch, opts), moe_layers(arch, opts)
