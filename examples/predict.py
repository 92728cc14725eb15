"""The main job (placeholder until the examples issue fills it in)."""

print("examples/predict.py: will compile a small model with torch-tensorrt-rtx and serve it through Trainer.predict")
