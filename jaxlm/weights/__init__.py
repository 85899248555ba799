"""Model weights from and to checkpoints: restoring a trained model (`loading`), `init_from`
params (`init_from`), frozen models a stage reads (`frozen`) and Hugging Face interop (`hf`)."""
