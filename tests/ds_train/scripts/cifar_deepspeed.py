"""A training script written for DeepSpeed, in the style of DeepSpeedExamples' training/cifar/cifar10_deepspeed.py.

It imports ``deepspeed`` and nothing from ds-train: the tests change only its import lines (``import deepspeed`` ->
``import ds_train as deepspeed``, ``from deepspeed.X import Y`` -> ``from ds_train.X import Y``) and run it, which is
the promise of ds-train's "Coming from DeepSpeed" section. With real DeepSpeed installed it runs as it is.

CIFAR-shaped synthetic data (3x32x32 images, 10 classes, a learnable rule) so that no download is needed.
Launch: ``deepspeed --num_gpus 2 cifar_deepspeed.py --deepspeed_config ds_config.json`` (or ds-launch, torchrun).
Rank 0 writes the losses and a few engine facts as JSON to ``--out``.
"""

import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import deepspeed
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import log_dist


def add_argument():
    parser = argparse.ArgumentParser(description="CIFAR-shaped synthetic data")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from distributed launcher")
    parser.add_argument("--epochs", type=int, default=30, help="upper bound; --steps ends the run first")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps to train (in all, across resumes)")
    parser.add_argument("--samples", type=int, default=512, help="size of the synthetic training set")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--save_dir", type=str, default=None, help="checkpoint here at the end; resume from it")
    parser.add_argument("--checkpoint_activations", default=False, action="store_true",
                        help="recompute the MLP head in backward (deepspeed.checkpointing)")
    parser.add_argument("--out", type=str, default=None, help="rank 0 writes the metrics here (JSON)")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class SyntheticCIFAR(torch.utils.data.Dataset):
    """Noisy images tinted with one of 10 class colours: learnable in a few steps."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(0)  # the class colours: the same for the training and the test set
        self.patterns = torch.randn(10, 3, 1, 1, generator=g).expand(10, 3, 32, 32)
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 10, (n,), generator=g)
        self.images = 0.5 * torch.randn(n, 3, 32, 32, generator=g) + self.patterns[self.labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class Net(nn.Module):
    def __init__(self, checkpoint_activations=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.checkpoint_activations = checkpoint_activations

    def head(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        if self.checkpoint_activations and self.training:
            return deepspeed.checkpointing.checkpoint(self.head, x)
        return self.head(x)


def main():
    deepspeed.init_distributed()
    args = add_argument()
    get_accelerator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    # rank 0 "prepares the data" first, as the CIFAR example lets it download
    if dist.get_rank() != 0:
        dist.barrier()
    trainset = SyntheticCIFAR(args.samples, seed=0)
    testset = SyntheticCIFAR(64, seed=1)
    if dist.get_rank() == 0:
        dist.barrier()

    if args.checkpoint_activations:
        deepspeed.checkpointing.configure(None, deepspeed_config=args.deepspeed_config)
    net = Net(args.checkpoint_activations)
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    model_engine, optimizer, trainloader, __ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=trainset)

    local_device = get_accelerator().device_name(model_engine.local_rank)
    local_rank = model_engine.local_rank
    target_dtype = None
    if model_engine.bfloat16_enabled():
        target_dtype = torch.bfloat16
    elif model_engine.fp16_enabled():
        target_dtype = torch.half
    log_dist(f"rank {model_engine.global_rank} of {model_engine.world_size} (dp {model_engine.dp_world_size}) on "
             f"{local_device}, dtype {target_dtype}, ZeRO stage {model_engine.zero_optimization_stage()}, "
             f"micro-batch {model_engine.train_micro_batch_size_per_gpu()}", ranks=[0])

    losses = []
    start_epoch = 0
    resumed_from = None
    if args.save_dir:
        load_path, client_state = model_engine.load_checkpoint(args.save_dir)
        if load_path is not None:
            losses = client_state["losses"]
            start_epoch = client_state["epoch"]
            resumed_from = model_engine.global_steps
            if client_state.get("loader") is not None:  # ds-train's loader resumes mid-epoch; DeepSpeed's cannot
                trainloader.load_state_dict(client_state["loader"])

    criterion = nn.CrossEntropyLoss()
    model_engine.train()
    epoch = start_epoch
    for epoch in range(start_epoch, args.epochs):
        if model_engine.global_steps >= args.steps:
            break
        for i, data in enumerate(trainloader):
            inputs, labels = data[0].to(local_device), data[1].to(local_device)
            if target_dtype is not None:
                inputs = inputs.to(target_dtype)
            outputs = model_engine(inputs)
            loss = criterion(outputs, labels)
            model_engine.backward(loss)
            model_engine.step()

            # the mean loss over the data-parallel ranks, for the log (deepspeed.comm, as scripts do)
            reported = loss.detach().float().clone()
            dist.all_reduce(reported)
            reported /= dist.get_world_size()
            if model_engine.was_step_applied():
                losses.append(reported.item())
                if local_rank == 0 and model_engine.global_steps % 2 == 0:
                    print(f"[{epoch + 1}, {i + 1:5d}] step {model_engine.global_steps} loss: {losses[-1]:.4f} "
                          f"lr: {model_engine.get_lr()[0]:.2e}")
            if model_engine.global_steps >= args.steps:
                break

    if args.save_dir:
        model_engine.save_checkpoint(args.save_dir, client_state={
            "losses": losses, "epoch": epoch, "loader": trainloader.state_dict() if hasattr(trainloader, "state_dict") else None})
    dist.barrier()

    # evaluation, as the example does after training
    model_engine.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(testset, batch_size=16):
            images = images.to(local_device)
            if target_dtype is not None:
                images = images.to(target_dtype)
            predicted = model_engine(images).float().argmax(1)
            correct += (predicted == labels.to(local_device)).sum().item()
            total += labels.size(0)
    get_accelerator().synchronize()

    if dist.get_rank() == 0 and args.out:
        facts = {
            "losses": losses, "resumed_from": resumed_from, "global_steps": model_engine.global_steps,
            "global_samples": model_engine.global_samples, "accuracy": correct / total,
            "world_size": model_engine.world_size, "dp_world_size": model_engine.dp_world_size,
            "zero_stage": model_engine.zero_optimization_stage(), "fp16": model_engine.fp16_enabled(),
            "bf16": model_engine.bfloat16_enabled(), "lr": model_engine.get_lr(),
            "batch": [model_engine.train_batch_size(), model_engine.train_micro_batch_size_per_gpu(),
                      model_engine.gradient_accumulation_steps()],
            "device": str(model_engine.device), "local_device": local_device,
            "backend": get_accelerator().communication_backend_name(),
            "n_params": sum(p.numel() for p in model_engine.parameters()),
            "state_dict_keys": sorted(model_engine.state_dict())[:3],
        }
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(facts, f)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
