"""A small image classifier trained on the data set itself, and the feature distance built on it.

LPIPS and Inception weights cannot be downloaded here, and Inception means little for
32x32 emoji. So enat trains its own CNN classifier on the data (`enat eval
train-features`) and uses it twice, as two separately trained networks:
- as the domain feature extractor of FID, KID, IS and class consistency (evaluation/);
- as a perceptual loss for the tokenizer (`FeatureDistance`): a reconstruction that keeps
  the classifier's features keeps what tells the classes apart (shapes, colours), which
  pixel losses alone blur away.
The two roles take different networks (another seed and width), so the tokenizer is never
trained against the extractor that scores the samples.
"""

from __future__ import annotations

from torch import Tensor, nn

FEATURE_DIM = 128


class DomainNet(nn.Module):
    """Three conv stages (two 3x3 convs each, then 2x2 max-pool), a conv to FEATURE_DIM
    channels, global average pooling, a linear classifier. ~0.15M parameters at width 16.
    Inputs are normalised float images (see `normalise_pixels`)."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                           nn.ReLU(inplace=True)]
                channels = out
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(channels, FEATURE_DIM, 3, padding=1, bias=False), nn.BatchNorm2d(FEATURE_DIM),
                   nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised float images [B, 3, R, R] -> (features [B, 128], logits [B, classes])."""
        features = self.body(images).mean(dim=(2, 3))
        return features, self.head(self.dropout(features))

    def stage_maps(self, images: Tensor) -> list[Tensor]:
        """The feature maps after each pooling stage and the last conv: coarse to fine
        structure, as LPIPS reads a network at several depths."""
        maps, x = [], images
        last = len(self.body) - 1
        for index, layer in enumerate(self.body):
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d) or index == last:
                maps.append(x)
        return maps


def normalise_pixels(images: Tensor) -> Tensor:
    """Float images in [0, 1] -> the classifier's input scale (roughly zero-mean, unit-scale)."""
    return (images - 0.5) / 0.25


class FeatureDistance(nn.Module):
    """LPIPS-style distance through a frozen DomainNet: at every stage, unit-normalise each
    position's feature vector, take the squared difference, sum over channels, average over
    positions and the batch; sum over stages. Images are float in [0, 1] at the classifier's
    resolution. Gradients flow to the images only."""

    def __init__(self, net: DomainNet):
        super().__init__()
        self.net = net.eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureDistance:
        super().train(mode)
        self.net.eval()  # batch norm keeps its running statistics
        return self

    def forward(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        total = images.new_zeros(())
        pairs = zip(self.net.stage_maps(normalise_pixels(images)),
                    self.net.stage_maps(normalise_pixels(reconstructions)), strict=True)
        for real, fake in pairs:
            real = real / (real.norm(dim=1, keepdim=True) + 1e-6)
            fake = fake / (fake.norm(dim=1, keepdim=True) + 1e-6)
            total = total + (real - fake).pow(2).sum(dim=1).mean()
        return total
