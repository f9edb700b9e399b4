"""Turn a frozen timm backbone (plus adaptation module) into a validated ONNX bundle."""
