"""Lower precision: Diffusers' quantization configs with torchao (`config`, `torchao_quant`), CPU int8 static
quantization calibrated on a pipeline (`static`), and what the CPU supports natively (`cpu`)."""
