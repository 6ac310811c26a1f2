"""Files where weights should be that are not whole checkpoints: random bytes, zero bytes, a cut
safetensors file. Each gives one line naming the file, its size and what it is not; random bytes are
never mistaken for a pickle to be trusted."""
import numpy as np
import pytest
import torch

from beit3 import BEiT3, BEiT3Config
from beit3.core.errors import BadFileError
from beit3.cli.export import main as export_main
from beit3.cli.predict import main as predict_main
from beit3.vqkd.vqkd import VQKD, VQKDConfig, load_trained_tokenizer, save_trained
from beit3.weights import UnsafeCheckpointError, load_checkpoint_file


def one_line(err: str, prog: str) -> str:
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_random_bytes_are_not_a_checkpoint_and_never_a_pickle_to_trust(tmp_path, capsys):
    junk = tmp_path / "beit3_base_patch16_224.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(300_000))
    for allow in ([], ["--allow-pickle"]):
        assert export_main(["--to", "safetensors", str(junk), "-o", str(tmp_path / "x.safetensors"), *allow]) == 2
        err = one_line(capsys.readouterr().err, "beit3 export")
        assert f"{junk} (300,000 bytes): not a torch checkpoint (neither a zip archive nor a legacy torch pickle) " \
               f"nor a safetensors file" in err
        assert "pickle=" not in err and "--allow-pickle" not in err and "pickled Python objects" not in err
    with pytest.raises(BadFileError) as e:
        load_checkpoint_file(str(junk), allow_pickle=True)
    assert not isinstance(e.value, UnsafeCheckpointError)

    legacy = tmp_path / "legacy.pt"  # torch's format before 1.6 is still a checkpoint
    torch.save({"w": torch.arange(3.0)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint_file(str(legacy))["w"], torch.arange(3.0))
    mislabelled = tmp_path / "weights.pth"  # a safetensors file under a torch name is read as one
    from safetensors.torch import save_file
    save_file({"w": torch.arange(3.0)}, str(mislabelled))
    assert torch.equal(load_checkpoint_file(str(mislabelled))["w"], torch.arange(3.0))


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_a_saved_model_or_tokenizer_folder_with_cut_weights_is_one_line(tmp_path, capsys, cut):
    model = BEiT3(BEiT3Config.from_preset("tiny", embed_dim=64, num_heads=4, ffn_dim=128, depth=1, vl_layers=1,
                                          img_size=32, patch_size=8, vocab_size=120))
    saved = tmp_path / "saved"
    model.save_pretrained(str(saved))
    vq = tmp_path / "vqkd"
    save_trained(VQKD(VQKDConfig.from_preset("tiny", num_codes=16)), vq)
    for weights in (saved / "model.safetensors", vq / "model.safetensors"):
        data = weights.read_bytes()
        weights.write_bytes(b"" if cut == "empty" else data[:len(data) // 2])
    size = "0 bytes" if cut == "empty" else f"{(saved / 'model.safetensors').stat().st_size:,} bytes"
    assert predict_main([str(saved), "--image", str(tmp_path / "x.jpg")]) == 2
    err = one_line(capsys.readouterr().err, "beit3 predict")
    assert f"{saved / 'model.safetensors'} ({size}): not a complete safetensors file" in err
    with pytest.raises(BadFileError, match=r"vqkd/model.safetensors \(.* bytes\): not a complete safetensors file"):
        load_trained_tokenizer(str(vq))
