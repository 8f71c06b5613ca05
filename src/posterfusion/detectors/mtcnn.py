"""facenet-pytorch's MTCNN cascade with its per-box Python loops replaced by batched tensor code.

``facenet_pytorch.models.utils.detect_face`` cuts every candidate box out of the image one at a
time and resamples it with ``F.interpolate(mode="area")``: thousands of tiny calls per batch of
posters (about three quarters of MTCNN's time on a CPU, and one kernel launch per box on a GPU).
Here all crops of a stage are resampled at once from an integral image.

facenet-pytorch itself is not imported on this path (it imports torchvision, and so
``torch._dynamo``: over a second of every cold start); its networks, weights files and helper
functions are used as they are, copied below with the package as the reference in the tests.

The result is *the same numbers*, not an approximation: the canvases hold whole-number pixel
values, so every area-resampling bin is a sum of integers, exact both in the integral image
(int64) and in the float32 sum PyTorch accumulates; the mean is then taken as PyTorch's area
kernel takes it (``sum / kh / kw`` in float32). The rest of the cascade (P-Net pyramid, R-Net,
O-Net, the NMS steps, thresholds) is facenet-pytorch 2.5.3's code, called or copied unchanged
(MIT licence, Tim Esler), so boxes and probabilities equal ``MTCNN.detect``'s bit for bit
(``tests/test_speedups.py`` checks this on real posters).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.functional import interpolate

from ._ops import batched_nms

_CHUNK = 1024  # boxes resampled per step: bounds the temporary memory (~1024 x 96 x 96 x 3 x 4 B)


def integral_image(pixels: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 pixels -> (B, H+1, W+1, C) integer integral image (exact sums)."""
    b, h, w, c = pixels.shape
    dtype = torch.int32 if 255 * h * w < 2**31 else torch.int64
    if pixels.device.type == "cpu":  # numpy's cumsum is ~1.5x faster than torch's on CPU
        np_dtype = np.int32 if dtype == torch.int32 else np.int64
        out = np.zeros((b, h + 1, w + 1, c), np_dtype)
        np.cumsum(pixels.numpy(), axis=1, dtype=np_dtype, out=out[:, 1:, 1:])
        np.cumsum(out[:, 1:, 1:], axis=2, out=out[:, 1:, 1:])
        return torch.from_numpy(out)
    out = torch.zeros((b, h + 1, w + 1, c), dtype=dtype, device=pixels.device)
    out[:, 1:, 1:] = pixels.to(dtype).cumsum(1, dtype=dtype).cumsum(2, dtype=dtype)
    return out


def resample_boxes(integral: torch.Tensor, image_inds: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor,
                   x0: torch.Tensor, x1: torch.Tensor, size: int) -> torch.Tensor:
    """``interpolate(img[i, :, y0:y1, x0:x1], (size, size), mode="area")`` for many boxes at once.

    ``integral`` comes from :func:`integral_image`. Bin edges are PyTorch's adaptive-pooling edges
    (``floor(i*h/size)`` to ``ceil((i+1)*h/size)``); each bin's sum is read from four corners of the
    integral image (one gather for all four), and divided as PyTorch divides (``sum / kh / kw``).
    Returns (N, C, size, size) float32, contiguous like facenet-pytorch's ``torch.cat`` of per-box
    results (its crops are copies, indexed by a tensor), so R-Net and O-Net see identical memory.
    """
    n = len(image_inds)
    _, height, width, channels = integral.shape
    out = torch.empty((n, channels, size, size), dtype=torch.float32, device=integral.device)
    flat = integral.reshape(-1, channels)
    i = torch.arange(size, device=integral.device)
    for s in range(0, n, _CHUNK):
        sl = slice(s, s + _CHUNK)
        h = (y1[sl] - y0[sl])[:, None]
        w = (x1[sl] - x0[sl])[:, None]
        ys = y0[sl, None] + torch.div(i * h, size, rounding_mode="floor")
        ye = y0[sl, None] + torch.div((i + 1) * h + size - 1, size, rounding_mode="floor")
        xs = x0[sl, None] + torch.div(i * w, size, rounding_mode="floor")
        xe = x0[sl, None] + torch.div((i + 1) * w + size - 1, size, rounding_mode="floor")
        rows = torch.cat((ys, ye), 1) * width + (image_inds[sl] * (height * width))[:, None]
        cols = torch.cat((xs, xe), 1)
        corners = flat.index_select(0, (rows[:, :, None] + cols[:, None, :]).reshape(-1))
        corners = corners.reshape(-1, 2 * size, 2 * size, channels)
        total = corners[:, size:, size:] - corners[:, :size, size:] - corners[:, size:, :size] + corners[:, :size, :size]
        kh = (ye - ys).to(torch.float32)[:, :, None, None]
        kw = (xe - xs).to(torch.float32)[:, None, :, None]
        out[sl] = (total.to(torch.float32) / kh / kw).permute(0, 3, 1, 2)
    return out


def _stage_input(imgs_integral: torch.Tensor, image_inds: torch.Tensor, y, ey, x, ex, size: int,
                 device: torch.device) -> torch.Tensor | None:
    """The crops of one refinement stage, normalised as facenet-pytorch normalises them.

    Returns None when a box has an empty crop: facenet-pytorch skips such boxes (and then
    misaligns its scores), so the caller falls back to the original code for that batch.
    """
    y, ey, x, ex = (torch.as_tensor(np.asarray(a, np.int64), device=device) for a in (y, ey, x, ex))
    if not bool(((ey > y - 1) & (ex > x - 1)).all()):
        return None
    im_data = resample_boxes(imgs_integral, image_inds.to(device), y - 1, ey, x - 1, ex, size)
    return (im_data - 127.5) * 0.0078125


def detect_face(imgs: torch.Tensor, minsize, pnet, rnet, onet, threshold, factor, device):
    """facenet-pytorch's ``detect_face`` for a (B, H, W, 3) batch, crops resampled in bulk."""
    imgs = torch.as_tensor(imgs, device=device)
    if len(imgs.shape) == 3:
        imgs = imgs.unsqueeze(0)
    if imgs.dtype != torch.uint8:  # exact sums need whole-number pixels
        return _reference(imgs.permute(0, 3, 1, 2), minsize, pnet, rnet, onet, threshold, factor, device)
    pixels = imgs  # (B, H, W, 3) uint8: summed exactly by the integral image
    model_dtype = next(pnet.parameters()).dtype
    imgs = imgs.permute(0, 3, 1, 2).type(model_dtype)

    batch_size = len(imgs)
    h, w = imgs.shape[2:4]
    m = 12.0 / minsize
    minl = min(h, w)
    minl = minl * m

    scale_i = m
    scales = []
    while minl >= 12:
        scales.append(scale_i)
        scale_i = scale_i * factor
        minl = minl * factor

    # First stage (unchanged)
    boxes = []
    image_inds = []
    scale_picks = []
    offset = 0
    for scale in scales:
        im_data = imresample(imgs, (int(h * scale + 1), int(w * scale + 1)))
        im_data = (im_data - 127.5) * 0.0078125
        reg, probs = pnet(im_data)
        boxes_scale, image_inds_scale = generateBoundingBox(reg, probs[:, 1], scale, threshold[0])
        boxes.append(boxes_scale)
        image_inds.append(image_inds_scale)
        pick = batched_nms(boxes_scale[:, :4], boxes_scale[:, 4], image_inds_scale, 0.5)
        scale_picks.append(pick + offset)
        offset += boxes_scale.shape[0]

    boxes = torch.cat(boxes, dim=0)
    image_inds = torch.cat(image_inds, dim=0)
    scale_picks = torch.cat(scale_picks, dim=0)
    boxes, image_inds = boxes[scale_picks], image_inds[scale_picks]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]

    regw = boxes[:, 2] - boxes[:, 0]
    regh = boxes[:, 3] - boxes[:, 1]
    qq1 = boxes[:, 0] + boxes[:, 5] * regw
    qq2 = boxes[:, 1] + boxes[:, 6] * regh
    qq3 = boxes[:, 2] + boxes[:, 7] * regw
    qq4 = boxes[:, 3] + boxes[:, 8] * regh
    boxes = torch.stack([qq1, qq2, qq3, qq4, boxes[:, 4]]).permute(1, 0)
    boxes = rerec(boxes)
    y, ey, x, ex = pad(boxes, w, h)

    integral = None
    if len(boxes) > 0:
        integral = integral_image(pixels)

    # Second stage
    if len(boxes) > 0:
        im_data = _stage_input(integral, image_inds, y, ey, x, ex, 24, imgs.device)
        if im_data is None:
            return _reference(imgs, minsize, pnet, rnet, onet, threshold, factor, device)
        out = fixed_batch_process(im_data, rnet)
        out0 = out[0].permute(1, 0)
        out1 = out[1].permute(1, 0)
        score = out1[1, :]
        ipass = score > threshold[1]
        boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
        image_inds = image_inds[ipass]
        mv = out0[:, ipass].permute(1, 0)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        boxes, image_inds, mv = boxes[pick], image_inds[pick], mv[pick]
        boxes = bbreg(boxes, mv)
        boxes = rerec(boxes)

    # Third stage
    points = torch.zeros(0, 5, 2, device=device)
    if len(boxes) > 0:
        y, ey, x, ex = pad(boxes, w, h)
        im_data = _stage_input(integral, image_inds, y, ey, x, ex, 48, imgs.device)
        if im_data is None:
            return _reference(imgs, minsize, pnet, rnet, onet, threshold, factor, device)
        out = fixed_batch_process(im_data, onet)
        out0 = out[0].permute(1, 0)
        out1 = out[1].permute(1, 0)
        out2 = out[2].permute(1, 0)
        score = out2[1, :]
        points = out1
        ipass = score > threshold[2]
        points = points[:, ipass]
        boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
        image_inds = image_inds[ipass]
        mv = out0[:, ipass].permute(1, 0)
        w_i = boxes[:, 2] - boxes[:, 0] + 1
        h_i = boxes[:, 3] - boxes[:, 1] + 1
        points_x = w_i.repeat(5, 1) * points[:5, :] + boxes[:, 0].repeat(5, 1) - 1
        points_y = h_i.repeat(5, 1) * points[5:10, :] + boxes[:, 1].repeat(5, 1) - 1
        points = torch.stack((points_x, points_y)).permute(2, 1, 0)
        boxes = bbreg(boxes, mv)
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
        boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

    boxes = boxes.cpu().numpy()
    image_inds = image_inds.cpu().numpy()
    return [boxes[image_inds == b] for b in range(batch_size)]


def _reference(imgs: torch.Tensor, *args) -> list[np.ndarray]:
    """facenet-pytorch's own loop (for the rare batch with an empty crop), in this module's form."""
    from facenet_pytorch.models.utils import detect_face as ref

    batch_boxes, _ = ref.detect_face(imgs.permute(0, 2, 3, 1), *args)
    return [np.asarray(b, np.float32).reshape(-1, 5) for b in batch_boxes]


def detect(mtcnn, canvases: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """``mtcnn.detect(canvases)`` as per-image (xyxy boxes, probabilities), float32.

    Boxes come in ``MTCNN.detect``'s order (largest first when ``select_largest``, its default).
    """
    with torch.no_grad():
        per_image = detect_face(canvases, mtcnn.min_face_size, mtcnn.pnet, mtcnn.rnet, mtcnn.onet,
                                mtcnn.thresholds, mtcnn.factor, mtcnn.device)
    out = []
    for box in per_image:
        if len(box) and mtcnn.select_largest:  # MTCNN.detect: largest face first
            box = box[np.argsort((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))[::-1]]
        out.append((box[:, :4].astype(np.float32), box[:, 4].astype(np.float32)))
    return out



class ChannelsLastMaxPool(torch.nn.Module):
    """A ceil-mode max-pool run in channels-last memory, its result handed back as it came.

    PyTorch's CPU max-pool is 2-5x slower on NCHW tensors than on channels-last ones for R-Net
    and O-Net's small crops (71 vs 26 ms for 1000 R-Net crops on 2 cores). A maximum is exact, and
    the next convolution gets the same values in the same memory layout, so the cascade's numbers
    do not change at all. (Running R-Net and O-Net in onnxruntime was faster still but moved face
    boxes by float rounding, which the integer crop windows turn into different expressions on
    ~0.3% of posters: not done.)
    """

    def __init__(self, pool: torch.nn.MaxPool2d) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
            return self.pool(x)
        return self.pool(x.contiguous(memory_format=torch.channels_last)).contiguous()


def fast_pools(mtcnn) -> None:
    """Swap R-Net's and O-Net's max-pools for :class:`ChannelsLastMaxPool` (CPU only)."""
    for net in (mtcnn.rnet, mtcnn.onet):
        for name, module in list(net.named_children()):
            if isinstance(module, torch.nn.MaxPool2d):
                setattr(net, name, ChannelsLastMaxPool(module))



# ------------------------------------------------------------------------------------------------
# facenet-pytorch 2.5.3 (MIT licence, Copyright (c) 2019 Timothy Esler): the three networks and the
# helpers of models/utils/detect_face.py, unchanged but for names, so that this module does not
# import the package (and torchvision with it). The weights are the package's own files.


def weights_folder() -> Path:
    """facenet-pytorch's ``data`` folder (pnet.pt, rnet.pt, onet.pt), found without importing it."""
    from ..errors import PosterFusionError

    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise PosterFusionError("face detector needs facenet-pytorch: pip install facenet-pytorch==2.5.3")
    return Path(spec.submodule_search_locations[0]) / "data"


class PNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        a = self.softmax4_1(self.conv4_1(x))
        b = self.conv4_2(x)
        return b, a


class RNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        a = self.softmax5_1(self.dense5_1(x))
        b = self.dense5_2(x)
        return b, a


class ONet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        a = self.softmax6_1(self.dense6_1(x))
        b = self.dense6_2(x)
        c = self.dense6_3(x)
        return b, c, a


class Mtcnn:
    """What :func:`detect` needs of facenet-pytorch's ``MTCNN(keep_all=True, ...)``: its three
    networks with the package's weights, and its default thresholds, pyramid factor and order."""

    def __init__(self, min_face_size: int = 20, device: str | torch.device = "cpu") -> None:
        folder = weights_folder()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for net, name in ((self.pnet, "pnet.pt"), (self.rnet, "rnet.pt"), (self.onet, "onet.pt")):
            net.load_state_dict(torch.load(folder / name, map_location="cpu", weights_only=True))
            net.eval().requires_grad_(False)
        self.min_face_size = min_face_size
        self.thresholds = [0.6, 0.7, 0.7]
        self.factor = 0.709
        self.select_largest = True
        self.device = torch.device(device)
        for net in (self.pnet, self.rnet, self.onet):
            net.to(self.device)
        if self.device.type == "cpu":
            fast_pools(self)


def fixed_batch_process(im_data, model):
    batch_size = 512
    out = []
    for i in range(0, len(im_data), batch_size):
        batch = im_data[i:(i + batch_size)]
        out.append(model(batch))
    return tuple(torch.cat(v, dim=0) for v in zip(*out))


def bbreg(boundingbox, reg):
    if reg.shape[1] == 1:
        reg = torch.reshape(reg, (reg.shape[2], reg.shape[3]))
    w = boundingbox[:, 2] - boundingbox[:, 0] + 1
    h = boundingbox[:, 3] - boundingbox[:, 1] + 1
    b1 = boundingbox[:, 0] + reg[:, 0] * w
    b2 = boundingbox[:, 1] + reg[:, 1] * h
    b3 = boundingbox[:, 2] + reg[:, 2] * w
    b4 = boundingbox[:, 3] + reg[:, 3] * h
    boundingbox[:, :4] = torch.stack([b1, b2, b3, b4]).permute(1, 0)
    return boundingbox


def generateBoundingBox(reg, probs, scale, thresh):  # noqa: N802 (facenet-pytorch's name)
    stride = 2
    cellsize = 12
    reg = reg.permute(1, 0, 2, 3)
    mask = probs >= thresh
    mask_inds = mask.nonzero()
    image_inds = mask_inds[:, 0]
    score = probs[mask]
    reg = reg[:, mask].permute(1, 0)
    bb = mask_inds[:, 1:].type(reg.dtype).flip(1)
    q1 = ((stride * bb + 1) / scale).floor()
    q2 = ((stride * bb + cellsize - 1 + 1) / scale).floor()
    boundingbox = torch.cat([q1, q2, score.unsqueeze(1), reg], dim=1)
    return boundingbox, image_inds


def nms_numpy(boxes, scores, threshold, method):
    if boxes.size == 0:
        return np.empty((0, 3))
    x1 = boxes[:, 0].copy()
    y1 = boxes[:, 1].copy()
    x2 = boxes[:, 2].copy()
    y2 = boxes[:, 3].copy()
    s = scores
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s)
    pick = np.zeros_like(s, dtype=np.int16)
    counter = 0
    while order.size > 0:
        i = order[-1]
        pick[counter] = i
        counter += 1
        idx = order[0:-1]
        xx1 = np.maximum(x1[i], x1[idx]).copy()
        yy1 = np.maximum(y1[i], y1[idx]).copy()
        xx2 = np.minimum(x2[i], x2[idx]).copy()
        yy2 = np.minimum(y2[i], y2[idx]).copy()
        w = np.maximum(0.0, xx2 - xx1 + 1).copy()
        h = np.maximum(0.0, yy2 - yy1 + 1).copy()
        inter = w * h
        if method == "Min":
            o = inter / np.minimum(area[i], area[idx])
        else:
            o = inter / (area[i] + area[idx] - inter)
        order = order[np.where(o <= threshold)]
    return pick[:counter].copy()


def batched_nms_numpy(boxes, scores, idxs, threshold, method):
    device = boxes.device
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=device)
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    boxes_for_nms = boxes + offsets[:, None]
    boxes_for_nms = boxes_for_nms.cpu().numpy()
    scores = scores.cpu().numpy()
    keep = nms_numpy(boxes_for_nms, scores, threshold, method)
    return torch.as_tensor(keep, dtype=torch.long, device=device)


def pad(boxes, w, h):
    boxes = boxes.trunc().int().cpu().numpy()
    x = boxes[:, 0]
    y = boxes[:, 1]
    ex = boxes[:, 2]
    ey = boxes[:, 3]
    x[x < 1] = 1
    y[y < 1] = 1
    ex[ex > w] = w
    ey[ey > h] = h
    return y, ey, x, ex


def rerec(bboxA):  # noqa: N803
    h = bboxA[:, 3] - bboxA[:, 1]
    w = bboxA[:, 2] - bboxA[:, 0]
    side = torch.max(w, h)
    bboxA[:, 0] = bboxA[:, 0] + w * 0.5 - side * 0.5
    bboxA[:, 1] = bboxA[:, 1] + h * 0.5 - side * 0.5
    bboxA[:, 2:4] = bboxA[:, :2] + side.repeat(2, 1).permute(1, 0)
    return bboxA


def imresample(img, sz):
    return interpolate(img, size=sz, mode="area")
