"""Model versions and their contracts: codes, specs, ONNX query encoders, versions and the MLflow registry."""
