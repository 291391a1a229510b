"""Training loops (wiring only): autoencoders and the expression/MSI models."""
