"""Fine-tuning internals behind `ln.finetune`, `ln.merge_adapter` and `Chat.use_adapter`.

collate.py: samples -> labelled model inputs and batches; train.py: the Trainer run;
adapters.py: adapters on a loaded model, merging, comparing; progress.py: the cell display.
"""
