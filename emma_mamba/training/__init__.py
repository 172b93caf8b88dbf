"""Two-stage training of EMMA-Mamba: config (:mod:`.config`), loop (:mod:`.trainer`), DDP/FSDP2 wrapping
(:mod:`.parallel`), optimizer and schedule (:mod:`.optim`), checkpoints (:mod:`.checkpoint`) and the
``emma-mamba pretrain`` / ``emma-mamba finetune`` commands (:mod:`.cli_train`)."""
