"""How hard does each loss term pull? Gradient norms of every weighted term of a checkpoint's training step.

    python bench/loss_balance.py runs/sed/checkpoint_0001000.pth
    python bench/loss_balance.py runs/sed/checkpoint_0001000.pth --method-args lambda_scale=0.1 lambda_distill=0.1
    python bench/loss_balance.py runs/supervised/checkpoint_0001000.pth --method sed   # before starting a method

A method's unsupervised terms come with weights tuned where the papers trained (COCO, ImageNet backbones, 800 px
images). Elsewhere the same weights can pull far harder, or far more weakly, than the supervised loss, and the
final AP only shows it after an hour of training. This bench shows it in a minute: it loads the student and the
teacher of a checkpoint, draws a few labeled and unlabeled batches of the run's own data, runs train.py's
`iteration_losses` at the end of the ramp (every unsupervised weight at its full value) and prints, for every
term times its weight, the norm of its gradient on each group of parameters (the first two parts of their names:
`rpn_head.objectness`, `head.box_reg`, ...), averaged over the batches. The last column is the norm on all of
them, and two rows sum the supervised and the unsupervised terms before taking the norm.

A supervised run's checkpoint has no teacher. With `--method NAME` it is read as train.py reads it when a method
continues a supervised run: the teacher is the student, and the method's settings are its preset's for the
checkpoint's dataset and detector (its `method_args` and unlabeled batch), the rest the checkpoint's own.

Example (the SED preset on Faster R-CNN at the end of its burn-in, docs/EXPERIMENTS.md, "SED's preset"): each of
the re-weighted RPN classification KLs pulled on the objectness layer 70-160x as hard as the supervised RPN loss.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import detectors  # noqa: E402
from data.loader import build_train_loaders  # noqa: E402
from engine.checkpoint import load_checkpoint, load_model_state  # noqa: E402
from engine.config import (METHODS, Config, build_method, dataset_preset, detector_kwargs,  # noqa: E402
                           parse_key_value)
from train import iteration_losses, labeled_views, training_sets  # noqa: E402


def parameter_groups(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    """Trainable parameters grouped by the first two parts of their names, in model order."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault(".".join(name.split(".")[:2]), []).append(parameter)
    return groups


def gradient_norms(value: torch.Tensor, groups: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """The norm of d value / d parameters on each group and on all of them ("all")."""
    flat = [p for params in groups.values() for p in params]
    grads = torch.autograd.grad(value, flat, retain_graph=True, allow_unused=True)
    squares, index = {}, 0
    for name, params in groups.items():
        part = grads[index:index + len(params)]
        index += len(params)
        squares[name] = sum(float(g.pow(2).sum()) for g in part if g is not None)
    return {name: s ** 0.5 for name, s in squares.items()} | {"all": sum(squares.values()) ** 0.5}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint of a semi-supervised run written by train.py")
    parser.add_argument("--method-args", nargs="*", default=[], type=parse_key_value, metavar="KEY=VALUE",
                        help="override the method's settings, as train.py's --method-args")
    parser.add_argument("--method", choices=[m for m in METHODS if m != "supervised"], default=None,
                        help="the method to measure at a supervised run's checkpoint (its teacher: the student)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--groups", nargs="*", default=None, metavar="PREFIX",
                        help="only the parameter groups that start with these prefixes (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="which batches are drawn")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    path = Path(args.checkpoint)
    state = load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    supervised = cfg.method == "supervised" or state["teacher"] is None
    if supervised and args.method is None:
        raise SystemExit(f"bench/loss_balance.py: {path} is a supervised run's checkpoint; it has no teacher: "
                         f"name the method to measure with --method")
    if args.method is not None and not supervised and args.method != cfg.method:
        raise SystemExit(f"bench/loss_balance.py: {path} is a {cfg.method} run's checkpoint, not {args.method}'s")
    if supervised:
        preset = dataset_preset(cfg.dataset, args.method, cfg.detector, cfg.max_iter)
        cfg.method, cfg.method_args, cfg.unlabeled_batch = args.method, preset.method_args, preset.unlabeled_batch
        state["teacher"] = state["model"]
    cfg.method_args |= dict(args.method_args)
    method = build_method(cfg.method, cfg=cfg, detector_name=cfg.detector)
    meta = state["meta"]
    student = detectors.build_detector(cfg.detector, num_classes=meta["num_classes"], **detector_kwargs(cfg))
    teacher = detectors.build_detector(cfg.detector, num_classes=meta["num_classes"], **detector_kwargs(cfg))
    load_model_state(student.model, state["model"], path=path, what="model")
    load_model_state(teacher.model, state["teacher"], path=path, what="teacher")
    if state["iteration"] <= method.teacher_init_iteration:
        # train.py copies the student into the teacher at that iteration (Dense Teacher: the end of burn-in),
        # after the checkpoint was written; until then the checkpoint's teacher is the untrained model.
        teacher.model.load_state_dict(student.model.state_dict())
        print(f"{path}: iteration {state['iteration']} <= the teacher's start ({method.teacher_init_iteration}): "
              f"the teacher is the student, as train.py makes it there")
    student.model.train()
    teacher.model.eval().requires_grad_(False)

    # The run's labeled split and unlabeled images, with its augmentations, as train.py builds them.
    sets = training_sets(cfg, method, out_dir=path.parent)
    loaders = build_train_loaders(sets.labeled, sets.unlabeled, labeled_batch=cfg.labeled_batch,
                                  unlabeled_batch=cfg.unlabeled_batch, seed=args.seed)

    groups = parameter_groups(student.model)
    if args.groups:
        groups = {name: params for name, params in groups.items() if name.startswith(tuple(args.groups))}
        if not groups:
            raise SystemExit(f"bench/loss_balance.py: no parameter group starts with {args.groups}")
    iteration = cfg.max_iter - 1  # past every burn-in and ramp: the unsupervised loss at its full weight
    sums: dict[str, dict[str, float]] = {}
    for _ in range(args.batches):
        labeled_batch, labeled_strong = labeled_views(next(loaders.labeled))
        out = iteration_losses(student=student, teacher=teacher, method=method, labeled=labeled_batch,
                               labeled_strong=labeled_strong, unlabeled=next(loaders.unlabeled),
                               iteration=iteration, norm_stats=cfg.norm_stats)
        terms = {key: out.weights[key] * value for key, value in out.losses.items() if out.weights[key] > 0}
        for side in ("sup", "unsup"):
            terms[f"{side} (sum)"] = sum(v for key, v in terms.items() if key.startswith(f"{side}_"))
        for key, value in terms.items():
            for name, norm in gradient_norms(value, groups).items():
                sums.setdefault(key, {}).setdefault(name, 0.0)
                sums[key][name] += norm / args.batches

    columns = list(groups) + ["all"]
    width = max(len(key) for key in sums) + 2
    column = max(10, max(len(name) for name in columns) + 2)
    print(f"{path}: {cfg.method} on {cfg.detector}, method args {cfg.method_args}; gradient norm of weight x term, "
          f"mean of {args.batches} batches at iteration {iteration}")
    print(f"{'term':<{width}}" + "".join(f"{name:>{column}}" for name in columns))
    for key, row in sums.items():
        print(f"{key:<{width}}" + "".join(f"{row[name]:{column}.4g}" for name in columns))


if __name__ == "__main__":
    main()
