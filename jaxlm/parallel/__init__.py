"""Parallelism: the device mesh and its logical-axis rules (`sharding`), joining a multi-process
job (`distributed`), and the peak FLOP/s of each accelerator kind for MFU (`hardware`)."""
