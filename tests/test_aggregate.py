import torch

from memfl.core.aggregate import fedavg
from memfl.core.protocol import Result


def _res(cid, samples, **tensors):
    return Result(client_id=cid, params=tensors, num_samples=samples, loss=0.0)


def test_weighted_average_and_partial_sends():
    g = {"a": torch.zeros(2), "b": torch.ones(2), "n": torch.tensor(3)}
    out = fedavg(
        g,
        [
            _res(0, 1, a=torch.tensor([1.0, 1.0]), n=torch.tensor(5)),
            _res(1, 3, a=torch.tensor([5.0, 9.0]), n=torch.tensor(4)),
        ],
    )
    assert torch.allclose(out["a"], torch.tensor([4.0, 7.0]))
    assert torch.equal(out["b"], g["b"])  # nobody trained it: unchanged
    assert int(out["n"]) == 5 and out["n"].dtype == g["n"].dtype
    assert torch.equal(g["a"], torch.zeros(2))  # input not modified


def test_unknown_tensor_is_an_error():
    import pytest

    with pytest.raises(KeyError, match="unknown tensor"):
        fedavg({"a": torch.zeros(1)}, [_res(0, 1, z=torch.zeros(1))])
