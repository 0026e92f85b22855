import math

import pytest
import torch
import torch.nn.functional as F

from dlarch_lib import nerf

# --------------------------------------------------------------------------- encoding and models


def test_positional_encoding_shape_and_frequencies():
    x = torch.tensor([[0.25, -0.5, 1.0]], dtype=torch.float64)  # (1, 3)
    L = 4
    gamma = nerf.positional_encoding(x, L)
    assert gamma.shape == (1, nerf.encoded_dim(3, L)) == (1, 3 * (2 * L + 1))
    torch.testing.assert_close(gamma[:, :3], x)  # the input comes first
    for k in range(L):
        sin_block = gamma[:, 3 + 6 * k : 6 + 6 * k]
        cos_block = gamma[:, 6 + 6 * k : 9 + 6 * k]
        torch.testing.assert_close(sin_block, torch.sin(2.0**k * math.pi * x))
        torch.testing.assert_close(cos_block, torch.cos(2.0**k * math.pi * x))


def test_positional_encoding_batch_axes_and_edge_cases():
    x = torch.randn(2, 5, 7, 2)
    assert nerf.positional_encoding(x, 3).shape == (2, 5, 7, 2 * 7)
    assert nerf.positional_encoding(x, 3, include_input=False).shape == (2, 5, 7, 2 * 6)
    torch.testing.assert_close(nerf.positional_encoding(x, 0), x)
    assert nerf.positional_encoding(x, 0, include_input=False).shape == (2, 5, 7, 0)
    assert nerf.encoded_dim(2, 3, include_input=False) == 12
    # each (sin, cos) pair lies on the unit circle
    enc = nerf.positional_encoding(x, 2, include_input=False).reshape(2, 5, 7, 2, 2, 2)  # (..., L, sin/cos, D)
    torch.testing.assert_close(enc[..., 0, :] ** 2 + enc[..., 1, :] ** 2, torch.ones(2, 5, 7, 2, 2))


@pytest.mark.parametrize("bad_L", [-1, 2.5, "3"])
def test_positional_encoding_rejects_bad_L(bad_L):
    with pytest.raises(ValueError, match="L"):
        nerf.positional_encoding(torch.zeros(3, 2), bad_L)


def test_positional_encoding_rejects_scalar():
    with pytest.raises(ValueError, match="scalar"):
        nerf.positional_encoding(torch.tensor(1.0), 2)


def test_mlp_layout_and_errors():
    net = nerf.mlp(5, 16, 3, 2)
    assert [type(m).__name__ for m in net] == ["Linear", "ReLU"] * 3 + ["Linear"]
    assert net(torch.zeros(4, 5)).shape == (4, 2)
    assert [type(m).__name__ for m in nerf.mlp(5, 16, 0, 2)] == ["Linear"]
    with pytest.raises(ValueError, match="depth"):
        nerf.mlp(5, 16, -1, 2)


@pytest.mark.parametrize("L", [None, 0, 5])
def test_coordinate_mlp_shapes(L):
    model = nerf.CoordinateMLP(in_dim=2, out_dim=3, width=8, depth=2, L=L)
    assert model(torch.rand(6, 2)).shape == (6, 3)
    first = model.net[0]
    assert first.in_features == (2 if L is None else nerf.encoded_dim(2, L))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        model(torch.rand(6, 3))


@pytest.mark.parametrize("L_dir", [None, 0, 2])
def test_tiny_nerf_outputs_are_valid_colours_and_densities(L_dir):
    torch.manual_seed(0)
    model = nerf.TinyNeRF(L_pos=3, L_dir=L_dir, width=16, depth=2)
    x = torch.randn(4, 5, 3)
    d = F.normalize(torch.randn(4, 5, 3), dim=-1)
    rgb, sigma = model(x, d)
    assert rgb.shape == (4, 5, 3) and sigma.shape == (4, 5)
    assert ((rgb > 0) & (rgb < 1)).all() and (sigma >= 0).all()
    # density depends on position only, even with view dependence
    _, sigma_other_dir = model(x, -d)
    torch.testing.assert_close(sigma, sigma_other_dir)
    if L_dir is None:
        torch.testing.assert_close(rgb, model(x, -d)[0])


def test_tiny_nerf_errors():
    with pytest.raises(ValueError, match="width"):
        nerf.TinyNeRF(width=1)
    model = nerf.TinyNeRF(L_pos=2, width=8, depth=1)
    with pytest.raises(ValueError, match="same shape"):
        model(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="same shape"):
        model(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="head_width"):
        nerf.TinyNeRF(head_width=0)


def test_tiny_nerf_colour_head_equals_the_concatenation():
    """The head computes W [h, gamma(d)] + b without concatenating, once per ray for expanded directions."""
    torch.manual_seed(0)
    model = nerf.TinyNeRF(L_pos=2, L_dir=2, width=16, depth=2, head_width=8)
    assert model.color[0].out_features == 8
    x = torch.randn(6, 5, 3)
    d_ray = F.normalize(torch.randn(6, 1, 3), dim=-1)
    h, _ = model.features(x)
    reference = torch.sigmoid(model.color(torch.cat([h, nerf.positional_encoding(d_ray.expand(6, 5, 3), 2)], dim=-1)))
    torch.testing.assert_close(model(x, d_ray.expand(6, 5, 3))[0], reference)  # stride-0 path
    torch.testing.assert_close(model(x, d_ray.expand(6, 5, 3).contiguous())[0], reference)  # general path


# --------------------------------------------------------------------------- cameras


def test_look_at_is_a_rigid_camera_looking_at_the_target():
    eye, target = torch.tensor([3.0, -1.0, 2.0]), torch.tensor([0.5, 0.2, -0.3])
    pose = nerf.look_at(eye, target)
    R = pose[:3, :3]
    torch.testing.assert_close(R.T @ R, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.linalg.det(R) == pytest.approx(1.0, abs=1e-6)  # a rotation, not a reflection
    torch.testing.assert_close(pose[:3, 3], eye)
    torch.testing.assert_close(-R[:, 2], F.normalize(target - eye, dim=0))  # looks down -z
    assert R[2, 1] > 0  # camera "up" has a positive world-z component
    torch.testing.assert_close(pose[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_look_at_errors():
    with pytest.raises(ValueError, match="coincide"):
        nerf.look_at((1, 1, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="parallel"):
        nerf.look_at((0, 0, 3))  # looking straight down the default up axis
    with pytest.raises(ValueError, match="3-vector"):
        nerf.look_at((1, 2))


def test_pose_on_sphere_and_random_poses():
    pose = nerf.pose_on_sphere(90.0, 30.0, 4.0)
    torch.testing.assert_close(pose[:3, 3], torch.tensor([0.0, 4 * math.cos(math.pi / 6), 2.0]), atol=1e-6, rtol=0)
    poses = nerf.random_poses(7, 3.0, elevation=(0.0, 45.0), seed=1)
    assert poses.shape == (7, 4, 4)
    centres = poses[:, :3, 3]
    torch.testing.assert_close(centres.norm(dim=-1), torch.full((7,), 3.0))
    elevation = torch.rad2deg(torch.asin(centres[:, 2] / 3.0))
    assert (elevation >= -1e-4).all() and (elevation <= 45 + 1e-4).all()
    torch.testing.assert_close(poses, nerf.random_poses(7, 3.0, elevation=(0.0, 45.0), seed=1))  # seeded
    assert not torch.allclose(poses, nerf.random_poses(7, 3.0, elevation=(0.0, 45.0), seed=2))
    with pytest.raises(ValueError, match="elevation"):
        nerf.pose_on_sphere(0.0, 90.0, 1.0)
    with pytest.raises(ValueError, match="n >= 1"):
        nerf.random_poses(0, 1.0)


def test_focal_from_fov():
    assert nerf.focal_from_fov(100, 90.0) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="fov"):
        nerf.focal_from_fov(100, 180.0)


def test_get_rays_geometry():
    H, W, focal = 6, 8, 5.0
    pose = nerf.look_at((2.0, 3.0, 1.0), (0.0, 0.0, 0.0))
    origins, dirs = nerf.get_rays(H, W, focal, pose)
    assert origins.shape == dirs.shape == (H, W, 3)
    torch.testing.assert_close(origins, pose[:3, 3].expand(H, W, 3))
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(H, W))
    # back in camera coordinates: pixel (j, i) sits at ((i + .5 - W/2) / f, -(j + .5 - H/2) / f, -1)
    cam = dirs @ pose[:3, :3]  # world -> camera (rotation transpose)
    cam = cam / -cam[..., 2:]  # scale to the image plane z = -1
    j, i = 1, 6
    torch.testing.assert_close(cam[j, i], torch.tensor([(i + 0.5 - W / 2) / focal, -(j + 0.5 - H / 2) / focal, -1.0]))
    # the image centre looks at the target; the rays are symmetric about it
    centre = (dirs[2, 3] + dirs[3, 4] + dirs[2, 4] + dirs[3, 3]) / 4
    torch.testing.assert_close(F.normalize(centre, dim=0), -pose[:3, 2], atol=1e-6, rtol=0)
    # row 0 is the top: its rays point more "up" (camera y) than the bottom row's
    assert (dirs[0] @ pose[:3, 1] > dirs[-1] @ pose[:3, 1]).all()


def test_get_rays_errors():
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        nerf.get_rays(4, 4, 1.0, torch.eye(3))
    with pytest.raises(ValueError, match="focal"):
        nerf.get_rays(4, 4, 0.0, torch.eye(4))


def test_rays_of_views():
    poses = nerf.random_poses(3, 4.0)
    rays = nerf.rays_of_views(poses, 4, 5, 3.0)
    assert rays.shape == (3 * 4 * 5, 6)
    origins, dirs = nerf.get_rays(4, 5, 3.0, poses[1])
    torch.testing.assert_close(rays[20:40], torch.cat([origins, dirs], dim=-1).reshape(-1, 6))
    with pytest.raises(ValueError, match="V, 4, 4"):
        nerf.rays_of_views(torch.eye(4), 4, 4, 1.0)


# --------------------------------------------------------------------------- volume rendering


def test_sample_along_rays_bins():
    t, delta = nerf.sample_along_rays(3, 1.0, 3.0, 4)
    torch.testing.assert_close(delta, torch.full((4,), 0.5))
    torch.testing.assert_close(t, torch.tensor([1.25, 1.75, 2.25, 2.75]).expand(3, 4))
    g = torch.Generator().manual_seed(0)
    ts, _ = nerf.sample_along_rays(1000, 1.0, 3.0, 4, stratified=True, generator=g)
    lower = torch.tensor([1.0, 1.5, 2.0, 2.5])
    assert ((ts >= lower) & (ts <= lower + 0.5)).all()  # one sample in each bin
    assert (ts.std(dim=0) > 0.1).all()  # ... and it moves
    with pytest.raises(ValueError, match="near < far"):
        nerf.sample_along_rays(1, 2.0, 1.0, 4)


@pytest.mark.parametrize("n_samples", [1, 7, 64])
def test_composite_constant_slab_matches_beer_lambert(n_samples):
    # a slab of constant density sigma and length L: opacity 1 - exp(-sigma L) for ANY number of bins
    sigma_value, length = torch.tensor([0.1, 0.7, 2.0, 10.0], dtype=torch.float64), 1.5
    R = len(sigma_value)
    sigma = sigma_value[:, None].expand(R, n_samples)
    colour = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    rgb = colour.expand(R, n_samples, 3)
    delta = torch.full((n_samples,), length / n_samples, dtype=torch.float64)
    C, w = nerf.composite(sigma, rgb, delta)
    opacity = 1 - torch.exp(-sigma_value * length)
    torch.testing.assert_close(w.sum(dim=-1), opacity)
    torch.testing.assert_close(C, opacity[:, None] * colour)
    # the weight of bin i is T_i alpha_i with T_i = exp(-sigma t_i)
    edges = torch.arange(n_samples, dtype=torch.float64) * length / n_samples
    expected = torch.exp(-sigma_value[:, None] * edges) * (1 - torch.exp(-sigma_value[:, None] * length / n_samples))
    torch.testing.assert_close(w, expected)


def test_composite_equals_front_to_back_product_and_converges_to_the_integral():
    torch.manual_seed(0)
    sigma, rgb = torch.rand(5, 6, dtype=torch.float64) * 3, torch.rand(5, 6, 3, dtype=torch.float64)
    delta = torch.rand(5, 6, dtype=torch.float64)  # per-ray bin widths are allowed
    C, w = nerf.composite(sigma, rgb, delta)
    alpha = 1 - torch.exp(-sigma * delta)
    T = torch.cumprod(torch.cat([torch.ones(5, 1, dtype=torch.float64), 1 - alpha[:, :-1]], dim=1), dim=1)
    torch.testing.assert_close(w, T * alpha)
    torch.testing.assert_close(C, (w[..., None] * rgb).sum(1))
    # a linearly rising density sigma(t) = a t on [0, 1] with a colour c(t) = t:
    # C = int_0^1 t * a t * exp(-a t^2 / 2) dt, computed in closed form with erf
    a = 3.0
    exact = -math.exp(-a / 2) + math.sqrt(math.pi / (2 * a)) * math.erf(math.sqrt(a / 2))
    errors = []
    for n in (16, 64, 256):
        t, d = nerf.sample_along_rays(1, 0.0, 1.0, n)
        t, d = t.double(), d.double()
        C_n, _ = nerf.composite(a * t, t[..., None].expand(1, n, 3), d)
        errors.append(abs(C_n[0, 0].item() - exact))
    assert errors[0] < 2e-3 and errors[-1] < errors[0] / 100  # second-order (midpoint) convergence


def test_composite_errors():
    with pytest.raises(ValueError, match=r"sigma \(R, N\)"):
        nerf.composite(torch.zeros(4), torch.zeros(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match=r"rgb \(R, N, 3\)"):
        nerf.composite(torch.zeros(2, 4), torch.zeros(2, 4, 4), torch.ones(4))


def _slab(density: float, lo: float, hi: float, colour=(1.0, 0.0, 0.0)):
    """A field with constant density between planes z = lo and z = hi (and nothing elsewhere)."""

    def field(x, d):
        inside = ((x[..., 2] > lo) & (x[..., 2] < hi)).to(x.dtype)
        return torch.tensor(colour, dtype=x.dtype).expand(*x.shape[:-1], 3), density * inside

    return field


def test_render_rays_through_a_slab_with_background():
    origins = torch.zeros(3, 3)
    dirs = torch.tensor([[0.0, 0.0, 1.0]]).expand(3, 3)
    out = nerf.render_rays(_slab(0.8, 1.0, 3.0), origins, dirs, near=0.0, far=4.0, n_samples=40, background=1.0)
    opacity = 1 - math.exp(-0.8 * 2.0)
    torch.testing.assert_close(out.acc, torch.full((3,), opacity))
    torch.testing.assert_close(out.rgb, torch.tensor([1.0, 1 - opacity, 1 - opacity]).expand(3, 3))
    assert out.weights.shape == (3, 40) and out.depth.shape == (3,)
    assert 1.0 < out.depth[0] < 3.0 * opacity  # expected depth inside the slab, weighted by opacity
    with pytest.raises(ValueError, match=r"\(R, 3\)"):
        nerf.render_rays(_slab(1.0, 0, 1), torch.zeros(3, 3), torch.zeros(2, 3), 0.0, 1.0, 4)


def test_render_image_and_views_of_the_scene():
    scene = nerf.SoftSpheresScene()
    H, W = 6, 5
    focal = nerf.focal_from_fov(W, 40.0)
    pose = nerf.pose_on_sphere(30.0, 20.0, 4.0)
    image = nerf.render_image(scene, pose, H, W, focal, 2.5, 5.5, 32, chunk=7)  # chunks that do not divide H*W
    assert image.rgb.shape == (H, W, 3) and image.depth.shape == (H, W) and image.weights.shape == (H, W, 32)
    origins, dirs = nerf.get_rays(H, W, focal, pose)
    rays = nerf.render_rays(scene, origins.reshape(-1, 3), dirs.reshape(-1, 3), 2.5, 5.5, 32)
    torch.testing.assert_close(image.rgb, rays.rgb.reshape(H, W, 3))
    assert 0.5 < image.acc[H // 2, W // 2] <= 1.0 + 1e-6  # the centre ray hits a sphere
    images, depths = nerf.render_views(scene, torch.stack([pose, pose]), H, W, focal, 2.5, 5.5, 32)
    assert images.shape == (2, H, W, 3) and depths.shape == (2, H, W)
    torch.testing.assert_close(images[1], image.rgb)
    assert ((images >= 0) & (images <= 1 + 1e-6)).all()
    with pytest.raises(ValueError, match="V, 4, 4"):
        nerf.render_views(scene, pose, H, W, focal, 2.5, 5.5)


def test_volume_renderer_module():
    torch.manual_seed(0)
    field = nerf.TinyNeRF(L_pos=2, L_dir=None, width=8, depth=1)
    renderer = nerf.VolumeRenderer(field, 2.0, 6.0, 8)
    rays = nerf.rays_of_views(nerf.random_poses(1, 4.0), 3, 3, 2.0)  # (9, 6)
    renderer.eval()
    out = renderer(rays)
    assert out.shape == (9, 3)
    torch.testing.assert_close(out, renderer(rays))  # midpoints in eval mode: deterministic
    torch.testing.assert_close(out, nerf.render_rays(field, rays[:, :3], rays[:, 3:], 2.0, 6.0, 8).rgb)
    renderer.train()
    assert not torch.allclose(renderer(rays), out)  # stratified samples in training mode
    F.mse_loss(renderer(rays), torch.zeros(9, 3)).backward()
    assert all(p.grad is not None for p in field.parameters())
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        renderer(rays[:, :3])
    with pytest.raises(ValueError, match="near < far"):
        nerf.VolumeRenderer(field, 6.0, 2.0, 8)


# --------------------------------------------------------------------------- scene and metric


def test_soft_spheres_scene():
    sphere = nerf.Sphere((0.0, 0.0, 0.0), 0.5, (1.0, 0.5, 0.0), density=20.0)
    scene = nerf.SoftSpheresScene([sphere], softness=0.01, light=(0.0, 0.0, 1.0), ambient=0.25)
    pts = torch.tensor([[0.0, 0.0, 0.49], [0.0, 0.0, -0.49], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    rgb, sigma = scene(pts)
    assert sigma[0] == pytest.approx(20 * torch.sigmoid(torch.tensor(1.0)).item(), rel=1e-5)
    assert sigma[2] == pytest.approx(20.0, rel=1e-5) and sigma[3] < 1e-6
    torch.testing.assert_close(rgb[0], torch.tensor([1.0, 0.5, 0.0]))  # lit side: full shading
    torch.testing.assert_close(rgb[1], 0.25 * torch.tensor([1.0, 0.5, 0.0]))  # dark side: ambient only
    # two spheres: the colour is the density-weighted mean
    two = nerf.SoftSpheresScene([sphere, nerf.Sphere((0.1, 0.0, 0.0), 0.5, (0.0, 0.0, 1.0), density=20.0)], ambient=1.0)
    rgb2, _ = two(torch.tensor([[0.05, 0.0, 0.0]]))
    torch.testing.assert_close(rgb2[0], torch.tensor([0.5, 0.25, 0.5]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sphere"):
        nerf.SoftSpheresScene([])
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        scene(torch.zeros(4, 2))


def test_psnr():
    a = torch.zeros(4, 4, 3)
    assert nerf.psnr(a, a) == math.inf
    assert nerf.psnr(a, a + 0.1) == pytest.approx(20.0)
    assert nerf.psnr(a, a + 0.5, max_val=0.5) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        nerf.psnr(a, torch.zeros(4, 4))


def test_sample_pdf_follows_the_weights():
    edges = torch.linspace(0.0, 4.0, 5).expand(2, 5)  # 4 bins of width 1
    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    t = nerf.sample_pdf(edges, weights, 40_000, generator=torch.Generator().manual_seed(0))
    share = torch.stack([torch.histc(row, bins=4, min=0.0, max=4.0) for row in t]) / 40_000
    torch.testing.assert_close(share, weights / weights.sum(-1, keepdim=True), atol=0.01, rtol=0.0)
    inside = t[0][(t[0] > 2) & (t[0] < 3)]  # uniform inside a bin: mean at the bin's centre
    assert abs(inside.mean().item() - 2.5) < 0.01
    det = nerf.sample_pdf(edges[:1], torch.tensor([[0.0, 0.0, 1.0, 0.0]]), 4, deterministic=True)
    assert ((det > 2) & (det < 3)).all() and torch.allclose(det.diff(), torch.full((1, 3), 0.25), atol=1e-3)


def test_render_at_uniform_midpoints_equals_render_rays():
    scene = nerf.SoftSpheresScene()
    origins, dirs = nerf.get_rays(4, 5, 5.0, nerf.pose_on_sphere(30.0, 20.0, 4.0))
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    ref = nerf.render_rays(scene, origins, dirs, 2.5, 5.5, 16)
    t, _ = nerf.sample_along_rays(origins.shape[0], 2.5, 5.5, 16)
    got, edges = nerf.render_at(scene, origins, dirs, t.flip(-1), 2.5, 5.5)  # order does not matter
    torch.testing.assert_close(got.rgb, ref.rgb)
    torch.testing.assert_close(got.depth, ref.depth)
    assert edges.shape == (20, 17)
    fine = nerf.render_hierarchical(scene, origins, dirs, 2.5, 5.5, 8, 8)
    assert fine.weights.shape == (20, 16) and (fine.acc <= 1 + 1e-6).all()


def test_hierarchical_errors():
    with pytest.raises(ValueError, match="edges"):
        nerf.sample_pdf(torch.zeros(2, 5), torch.zeros(2, 5), 3)
    with pytest.raises(ValueError, match="non-negative"):
        nerf.sample_pdf(torch.zeros(1, 3), torch.tensor([[1.0, -1.0]]), 3)
    with pytest.raises(ValueError, match="t"):
        nerf.render_at(nerf.SoftSpheresScene(), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3, 4), 1.0, 2.0)


# --------------------------------------------------------------------------- view dependence


def _one_sphere(**kw):
    return nerf.SoftSpheresScene(
        [nerf.Sphere((0.0, 0.0, 0.0), 0.5, (0.5, 0.5, 0.5))], softness=0.01, light=(0.0, 0.6, 0.8), ambient=0.2, **kw
    )


def test_specular_highlight_is_largest_at_the_mirror_direction():
    scene = _one_sphere(specular=0.8, shininess=10.0)
    n = torch.tensor([0.0, 0.0, 1.0])  # the top of the sphere: normal +z
    light = scene.light
    mirror = 2 * (n @ light) * n - light  # the viewer's direction -d that reflects the light
    x = (0.49 * n).expand(65, 3)
    angles = torch.linspace(-1.2, 1.2, 65)  # tilt the viewer away from the mirror direction, about the x axis
    c, s = angles.cos(), angles.sin()
    rot = torch.stack(
        [
            torch.stack([torch.ones_like(c), 0 * c, 0 * c], -1),
            torch.stack([0 * c, c, -s], -1),
            torch.stack([0 * c, s, c], -1),
        ],
        -2,
    )  # (65, 3, 3)
    d = -(rot @ mirror)  # (65, 3) ray directions
    rgb, _ = scene(x, d)
    assert rgb[:, 0].argmax().item() == 32  # the brightest view is the mirror one (angle 0)
    assert (rgb[:32, 0].diff() > 0).all() and (rgb[32:, 0].diff() < 0).all()  # and it fades on both sides
    m = scene.highlight(n.expand(65, 1, 3), d)[:, 0]
    assert m.max().item() == pytest.approx(0.8, rel=1e-4) and (m >= 0).all() and (m <= 0.8).all()
    # by hand at the mirror direction: h = n, so the colour is (1 - k_s) diffuse + k_s
    rgb0, _ = scene(x[:1], -mirror[None])
    diffuse, _ = _one_sphere()(x[:1], -mirror[None])
    torch.testing.assert_close(rgb0, 0.2 * diffuse + 0.8, atol=1e-4, rtol=0)


def test_specular_zero_is_the_lambertian_scene():
    x = torch.randn(50, 3) * 0.6
    d = F.normalize(torch.randn(50, 3), dim=-1)
    plain, shiny_off = _one_sphere(), _one_sphere(specular=0.0, shininess=50.0)
    torch.testing.assert_close(plain(x, d), shiny_off(x, d))
    torch.testing.assert_close(plain(x, d)[0], plain(x, -d)[0])  # no view dependence
    shiny = _one_sphere(specular=0.5)
    assert not torch.allclose(shiny(x, d)[0], shiny(x, -d)[0])
    torch.testing.assert_close(shiny(x, d)[1], plain(x, d)[1])  # the density never depends on d
    rgb = shiny(x, d)[0]
    assert (rgb >= 0).all() and (rgb <= 1).all()


@pytest.mark.parametrize("kw", [{"specular": -0.1}, {"specular": 1.5}, {"shininess": 0.0}, {"shininess": -2.0}])
def test_specular_rejects_bad_parameters(kw):
    with pytest.raises(ValueError, match="specular"):
        _one_sphere(**kw)


def test_specular_scene_needs_directions():
    with pytest.raises(ValueError, match="directions"):
        _one_sphere(specular=0.5)(torch.zeros(4, 3))


def test_azimuth_rotations():
    R = nerf.azimuth_rotations([0.0, 90.0])
    torch.testing.assert_close(R[0], torch.eye(3))
    torch.testing.assert_close(R[1] @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="angle"):
        nerf.azimuth_rotations([])


def test_direction_averaged_field():
    torch.manual_seed(0)
    model = nerf.TinyNeRF(L_pos=2, L_dir=2, width=16, depth=2)
    R = nerf.azimuth_rotations([-30.0, 10.0, 45.0])
    x, d = torch.randn(5, 7, 3), F.normalize(torch.randn(5, 7, 3), dim=-1)
    rgb, sigma = nerf.direction_averaged(model, R)(x, d)
    by_hand = torch.stack([model(x, d @ Rk.T)[0] for Rk in R]).mean(0)
    torch.testing.assert_close(rgb, by_hand)  # the TinyNeRF shortcut equals the definition
    torch.testing.assert_close(sigma, model(x, d)[1])
    # a generic field takes the general path; a Lambertian one is unchanged by the averaging
    scene = nerf.SoftSpheresScene()
    torch.testing.assert_close(nerf.direction_averaged(scene, R)(x, d), scene(x, d))
    with pytest.raises(ValueError, match="rotations"):
        nerf.direction_averaged(model, torch.eye(3))
    with pytest.raises(ValueError, match="one shape"):
        nerf.direction_averaged(model, R)(x, d[..., :2])
