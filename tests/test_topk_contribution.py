"""A TopK SAE whose decoder rows keep their norms ranks latents by their contribution pre_i ||W_dec,i|| (SAELens's
rescale_acts_by_decoder_norm); its export is the same SAE with the norms folded into the encoder."""

import torch

from saelightning.export import load_sae, save_sae
from saelightning.saes import SAEConfig, build_sae


def _sae(normalize: bool):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=6, d_sae=4, k=1, normalize_decoder=normalize,
                              decoder_init_norm=None if normalize else 0.1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(6)[:, :4])  # pre-activations = x[:, :4]
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.eye(4, 6) * torch.tensor([[1.0], [3.0], [1.0], [1.0]]))  # latent 1's row has norm 3
    return sae


def test_the_k_largest_are_the_largest_contributions_with_a_free_norm_decoder():
    x = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])  # pre = (2, 1, 0, 0): contributions (2, 3, 0, 0)
    free, unit = _sae(False), _sae(True)
    assert free.encode(x).nonzero().tolist() == [[0, 1]]  # latent 1: the larger contribution
    assert unit.encode(x).nonzero().tolist() == [[0, 0]]  # unit rows (SAEConfig default): the larger pre-activation
    torch.testing.assert_close(free.decode(free.encode(x)), torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.0, 0.0]]))
    values, indices = free.encode_sparse(x)
    assert indices.tolist() == [[1]] and values.tolist() == [[1.0]]  # the latent's value stays relu(pre)
    _, latents, _ = free.train()(x, sparse=True)
    assert latents.indices.tolist() == [[1]]  # the training forward ranks the same way


def test_the_export_folds_the_norms_and_is_the_same_sae(tmp_path):
    free = _sae(False)
    with torch.no_grad():
        free.W_dec.add_(0.3 * torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))
        free.b_enc.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        free.b_dec.copy_(torch.randn(6, generator=torch.Generator().manual_seed(2)))
    loaded = load_sae(save_sae(free, tmp_path / "sae"))
    assert torch.allclose(loaded.W_dec.norm(dim=1), torch.ones(4), atol=1e-6)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded.encode(x) != 0, free.encode(x) != 0)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), free.decode(free.encode(x)), rtol=1e-5, atol=1e-5)
