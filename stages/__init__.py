"""The pipeline's stages. Each ``stages/<name>.py`` has a validated config, ``run(cfg)`` and ``main()``."""

STAGE_ORDER = ("data", "pretrain", "offline", "online", "evaluate", "export")
