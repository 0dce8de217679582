"""Semi-supervised methods: Soft Teacher, Dense Teacher and SED, one file each, on a shared core.

    method = engine.config.build_method("soft_teacher", cfg=cfg, detector_name="faster_rcnn")  # None: supervised
    method = semi.soft_teacher.build_soft_teacher(SoftTeacherConfig(...), detector_name="faster_rcnn")

The training loop (train.py) owns the iteration; a method owns only its unsupervised loss, the weights of
its terms and its teacher's EMA rate. `semi.core.Method` is that interface, every attribute train.py reads
(ARCHITECTURE.md, "The training loop and the method interface"):

    method.unsupervised_loss(*, student: Detector, teacher: Detector, unlabeled: UnlabeledBatch, iteration: int)
        -> semi.core.UnsupOutput(losses      unweighted terms, keys without prefix ("loss_cls", ...),
                                 pseudo_boxes B dicts {"boxes", "scores", "labels"} in the weak view, or None,
                                 stats       floats worth logging)
    method.loss_weights(iteration) -> {"unsup_<key>": weight}     burn-in and ramp included
    method.ema_momentum(iteration) -> float | None                None: no EMA update this iteration
    method.ema_include_buffers -> bool                            average BatchNorm buffers too, or copy them
    method.teacher_init_iteration -> int                          the teacher is (re)copied from the student here
    method.labeled_views -> ("weak",) or ("weak", "strong")       views the supervised loss is taken on
    method.unlabeled_aligned -> bool                              strong view pixel-aligned with the weak one

Each method file holds its config dataclass (defaults from its paper, docs/METHODS.md), its builder, which takes
that dataclass, and its teacher's EMA schedule; `engine.config` maps a run's settings onto the dataclass.
Shared pieces: `semi/ema.py` (the EMA teacher), `semi/core.py` (the method interface, loss prefixes and the one
weighted sum, the burn-in ramp), `semi/ops.py` (fused ops with plain-PyTorch references).
"""
