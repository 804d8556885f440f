"""Observed lens images from FITS (tfhybrid.lens.observations): pixel scale from the WCS in
any angular unit, the checks a real image must pass, the brightness scale, the noise estimate."""

import numpy as np
import pytest
from astropy.io import fits

from tfhybrid.data.preprocess import estimate_noise_sigma
from tfhybrid.lens.observations import flux_scale, read_lens_image, read_psf_image
from tfhybrid.validation import TfhybridInputError


def _write(path, data, **cards):
    hdu = fits.PrimaryHDU(np.asarray(data, np.float32))
    for k, v in cards.items():
        hdu.header[k] = v
    hdu.writeto(path)
    return path


def _tan_wcs(cdelt1_deg, cdelt2_deg, cunit="deg"):
    return dict(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRPIX1=16.5, CRPIX2=16.5,
                CRVAL1=150.1, CRVAL2=2.2, CDELT1=cdelt1_deg, CDELT2=cdelt2_deg,
                CUNIT1=cunit, CUNIT2=cunit)


def test_pixel_scale_comes_from_the_wcs_in_any_unit_or_from_pixscale(tmp_path):
    img = np.random.default_rng(0).normal(size=(32, 32))
    # 0.04" as degrees (RA axis flipped, as on the sky), as arcsec, and through a CD matrix
    p = _write(tmp_path / "deg.fits", img, **_tan_wcs(-0.04 / 3600, 0.04 / 3600))
    assert read_lens_image(p).pixel_scale_arcsec == pytest.approx(0.04, rel=1e-9)
    p = _write(tmp_path / "arcsec.fits", img, **_tan_wcs(-0.04, 0.04, "arcsec"))
    assert read_lens_image(p).pixel_scale_arcsec == pytest.approx(0.04, rel=1e-9)
    cd = {k: v for k, v in _tan_wcs(0, 0).items() if not k.startswith("CDELT")}
    c, s = np.cos(0.3), np.sin(0.3)  # rotated by 0.3 rad: the scale is the same
    cd.update(CD1_1=-0.05 / 3600 * c, CD1_2=0.05 / 3600 * s, CD2_1=0.05 / 3600 * s,
              CD2_2=0.05 / 3600 * c)
    p = _write(tmp_path / "cd.fits", img, **cd)
    assert read_lens_image(p).pixel_scale_arcsec == pytest.approx(0.05, rel=1e-9)
    nounit = {k: v for k, v in _tan_wcs(-0.04 / 3600, 0.04 / 3600).items()
              if not k.startswith("CUNIT")}  # degrees by the FITS standard
    p = _write(tmp_path / "nounit.fits", img, **nounit)
    assert read_lens_image(p).pixel_scale_arcsec == pytest.approx(0.04, rel=1e-9)
    p = _write(tmp_path / "pixscale.fits", img, PIXSCALE=0.03)
    lens = read_lens_image(p)
    assert lens.pixel_scale_arcsec == 0.03 and lens.image.shape == (32, 32)
    assert lens.image.dtype == np.float32
    # the caller's value wins, in arcsec or as an astropy angle
    import astropy.units as u

    assert read_lens_image(p, 0.1).pixel_scale_arcsec == 0.1
    assert read_lens_image(p, 2 * u.mas).pixel_scale_arcsec == pytest.approx(0.002)


def test_bad_images_are_refused_with_what_to_do(tmp_path):
    img = np.zeros((32, 32))
    with pytest.raises(TfhybridInputError, match="does not exist"):
        read_lens_image(tmp_path / "missing.fits")
    (tmp_path / "text.fits").write_text("not a FITS file")
    with pytest.raises(TfhybridInputError, match="not a readable FITS file"):
        read_lens_image(tmp_path / "text.fits")
    p = _write(tmp_path / "noscale.fits", img)
    with pytest.raises(TfhybridInputError, match=r"cannot tell the pixel scale.*--pixel-scale"):
        read_lens_image(p)
    p = _write(tmp_path / "rect.fits", np.zeros((32, 40)), PIXSCALE=0.04)
    with pytest.raises(TfhybridInputError, match="32 × 40 pixels.*square image"):
        read_lens_image(p)
    nan = img.copy()
    nan[3, 4] = np.nan
    p = _write(tmp_path / "nan.fits", nan, PIXSCALE=0.04)
    with pytest.raises(TfhybridInputError, match="1 NaN or inf pixel"):
        read_lens_image(p)
    p = _write(tmp_path / "cube.fits", np.zeros((3, 32, 32)), PIXSCALE=0.04)
    with pytest.raises(TfhybridInputError, match="no 2-D image HDU"):
        read_lens_image(p)
    p = _write(tmp_path / "skew.fits", img, **_tan_wcs(-0.04 / 3600, 0.05 / 3600))
    with pytest.raises(TfhybridInputError, match="non-square pixels"):
        read_lens_image(p)
    p = _write(tmp_path / "badwcs.fits", img, **dict(_tan_wcs(-1e-5, 1e-5), CTYPE1="RA---XYZ"))
    with pytest.raises(TfhybridInputError, match="WCS cannot be read.*--pixel-scale"):
        read_lens_image(p)
    p = _write(tmp_path / "ok.fits", img, PIXSCALE=0.04)
    with pytest.raises(TfhybridInputError, match="pixel scale"):
        read_lens_image(p, -0.04)
    with pytest.raises(TfhybridInputError, match="no HDU 'SCI'"):
        read_lens_image(p, hdu="SCI")
    with pytest.raises(TfhybridInputError, match="no positive light"):
        flux_scale(-np.ones((8, 8)))


def test_flux_scale_is_the_smoothed_peak_and_the_noise_estimate_ignores_the_arcs():
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:128, :128]
    r = np.hypot(x - 64, y - 64)
    arc = 5.0 * np.exp(-0.5 * ((r - 30) / 2.0) ** 2) * (x > 50)  # a bright, thin arc
    noisy = arc + 0.1 * rng.normal(size=arc.shape)
    spiked = noisy.copy()
    spiked[5, 5] = 100.0  # one cosmic ray sets no scale
    assert flux_scale(spiked) == pytest.approx(flux_scale(noisy), rel=0.02)
    assert flux_scale(arc) == pytest.approx(5.0, rel=0.05)  # a 4.7-pixel-wide arc keeps it
    # σ from neighbouring pixels' differences, clipped: the 50σ arc, over 3 % of the pixels,
    # biases it by < 4 % (by 8 % without the clipping); a pure-noise image gives σ to 2 %
    assert float(estimate_noise_sigma(noisy)) == pytest.approx(0.1, rel=0.04)
    assert float(estimate_noise_sigma(rng.normal(size=(128, 128)))) == pytest.approx(
        1.0, rel=0.02)
    both = estimate_noise_sigma(np.stack([noisy, 2 * noisy]))
    assert both.shape == (2,) and both[1] == pytest.approx(2 * both[0])
    holed = noisy.copy()
    holed[:, :10] = np.nan  # NaN pixels (masked) are ignored
    assert float(estimate_noise_sigma(holed)) == pytest.approx(0.1, rel=0.04)


def test_psf_images_are_read_centred_and_binned_from_a_whole_oversampling(tmp_path):
    from tfhybrid.physics.psf import gaussian_psf

    fwhm = 0.47
    at_image = gaussian_psf(fwhm, 0.16, 11).astype(np.float64)
    # no pixel scale in the header: the images' own
    kernel, factor = read_psf_image(_write(tmp_path / "same.fits", 5 * at_image), 0.16)
    assert factor == 1
    np.testing.assert_allclose(kernel, at_image / at_image.sum(), rtol=1e-6)
    # 3x oversampled (a model PSF): binned to the images' pixels, exactly for a pixel-
    # integrated profile (float32 file: 1e-6)
    fine = gaussian_psf(fwhm, 0.16 / 3, 33)
    kernel, factor = read_psf_image(_write(tmp_path / "x3.fits", fine, PIXSCALE=0.16 / 3), 0.16)
    assert factor == 3 and kernel.shape == (11, 11)
    np.testing.assert_allclose(kernel, at_image / at_image.sum(), atol=1e-6 * at_image.max())
    bad = [
        (_write(tmp_path / "even.fits", np.ones((10, 11))), "sides must be odd"),
        (_write(tmp_path / "ratio.fits", fine, PIXSCALE=0.16 / 2.5), "ratio 2.5 is not a whole"),
        (_write(tmp_path / "coarser.fits", at_image, PIXSCALE=0.32), "ratio 0.5 is not a whole"),
        (_write(tmp_path / "neg.fits", -at_image), "positive sum"),
        (_write(tmp_path / "nan.fits", np.where(at_image > at_image.max() / 2, np.nan,
                                                    at_image)), "NaN or inf"),
        (_write(tmp_path / "shifted.fits", np.roll(at_image, 3, axis=1)),
         r"brightest pixel is at \(y, x\) = \(5, 8\), not the central pixel \(5, 5\)"),
        (tmp_path / "missing.fits", "PSF file .* does not exist"),
    ]
    for path, match in bad:
        with pytest.raises(TfhybridInputError, match=match):
            read_psf_image(path, 0.16)
