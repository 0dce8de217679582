"""Semi-supervised methods: Soft Teacher, Dense Teacher and SED, one file each, on a shared core.

    method = build_method("soft_teacher", cfg=cfg, detector_name="faster_rcnn")   # None for "supervised"

The training loop (train.py) owns the iteration; a method owns only its unsupervised loss, the weights of
its terms and its teacher's EMA rate (ARCHITECTURE.md, "The training loop and the method interface"):

    method.unsupervised_loss(*, student: Detector, teacher: Detector, unlabeled: UnlabeledBatch, iteration: int)
        -> semi.core.UnsupOutput(losses      unweighted terms, keys without prefix ("loss_cls", ...),
                                 pseudo_boxes B dicts {"boxes", "scores", "labels"} in the weak view, or None,
                                 stats       floats worth logging)
    method.loss_weights(iteration) -> {"unsup_<key>": weight}     burn-in and ramp included
    method.ema_momentum(iteration) -> float | None                None: no EMA update this iteration
    method.teacher_init_iteration -> int                          the teacher is (re)copied from the student here
    method.labeled_views -> ("weak",) or ("weak", "strong")       views the supervised loss is taken on
    method.unlabeled_aligned -> bool                              strong view pixel-aligned with the weak one

Shared pieces: `semi/ema.py` (the EMA teacher and the momentum schedules), `semi/core.py` (loss prefixes and
the one weighted sum, burn-in ramp, boxes carried between views, pseudo-label diagnostics), `semi/ops.py`
(fused ops with plain-PyTorch references).
"""


def build_method(name: str, *, cfg, detector_name: str):
    """The method `name` for a run's config (`engine.config.Config`; its `method_args` override the method's
    own defaults by field name). Each method is imported only when asked for."""
    if name == "supervised":
        return None
    if name == "soft_teacher":
        from semi.soft_teacher import build_soft_teacher
        return build_soft_teacher(cfg, detector_name=detector_name)
    if name == "dense_teacher":
        from semi.dense_teacher import build_dense_teacher
        return build_dense_teacher(cfg, detector_name=detector_name)
    if name == "sed":
        from semi.sed import build_sed
        return build_sed(cfg, detector_name=detector_name)
    raise ValueError(f"semi: unknown method {name!r}; expected 'supervised', 'soft_teacher', 'dense_teacher' or 'sed'")
