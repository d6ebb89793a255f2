"""Running one model across processes (torch.distributed): tensor parallel groups and their collectives."""
