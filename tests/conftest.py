import torch

# the machine is small and shared with a background training job: keep every test single-threaded
torch.set_num_threads(1)
