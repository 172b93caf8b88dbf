"""Two-stage training of EMMA-Mamba: config (:mod:`.config`), loop (:mod:`.trainer`), DDP/FSDP2 wrapping
(:mod:`.parallel`), optimizer and schedule (:mod:`.optim`), checkpoints (:mod:`.checkpoint`) and the
``emma-mamba pretrain`` / ``emma-mamba finetune`` commands (:mod:`.cli_train`)."""


class TrainingError(RuntimeError):
    """A run that cannot go on, with one message naming why and where (a checkpoint that cannot be read or does
    not fit this run, a non-finite loss); ``emma-mamba pretrain|finetune`` prints it without a traceback."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C (SIGINT) during the steps; the message says where the run stopped and what it can resume from."""
