"""Small builders shared by the test modules (imported as ``helpers``: pytest puts ``tests/`` on
the path)."""

import jax

import jax_bptt as jb


def random_state(key, cell, batch: int, hidden: int, dtype, scale: float = 0.5):
    """A random state of ``cell`` for ``batch`` rows: N(0, scale^2) entries in every leaf."""
    zero = jb.get_cell(cell).zero_state((batch,), hidden, dtype)
    leaves, tree = jax.tree_util.tree_flatten(zero)
    keys = jax.random.split(key, len(leaves))
    noise = [
        scale * jax.random.normal(k, a.shape, dtype) for k, a in zip(keys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, noise)


def make_torch_rnn(torch, cell, seed, input_size, hidden_size, **kwargs):
    """PyTorch's ``nn.RNN``/``LSTM``/``GRU`` for one of our cell names, float64, seeded."""
    torch.manual_seed(seed)
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, dtype=torch.float64, **kwargs)
    if cell == "lstm":
        return torch.nn.LSTM(**kwargs)
    if cell == "gru":
        return torch.nn.GRU(**kwargs)
    return torch.nn.RNN(nonlinearity=cell.removeprefix("elman_"), **kwargs)
