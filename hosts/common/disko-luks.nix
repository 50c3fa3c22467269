# Disk layout of a site box (disko): GPT with an EFI system partition, a LUKS2
# volume (AES-256-XTS, argon2id) holding btrfs subvolumes for /, /nix and
# /var/lib (where the agent's evidence and the clinic's data live), and swap
# encrypted with a random key at every boot. The installer formats with it.
{ config, lib, ... }:
let
  cfg = config.compliance.disk;
in
{
  options.compliance.disk = {
    device = lib.mkOption {
      type = lib.types.str;
      default = "/dev/sda";
      description = "The disk the installer partitions (prefer a /dev/disk/by-id/ path).";
      example = "/dev/disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T123456";
    };
    swapSize = lib.mkOption {
      type = lib.types.str;
      default = "8G";
      description = "Size of the encrypted swap partition.";
    };
    passwordFile = lib.mkOption {
      type = lib.types.str;
      default = "/tmp/disk.key";
      description = "File with the LUKS passphrase while the installer formats; it is not used after installation.";
    };
  };

  config.disko.devices.disk.main = {
    type = "disk";
    inherit (cfg) device;
    content = {
      type = "gpt";
      partitions = {
        ESP = {
          size = "1G";
          type = "EF00";
          content = {
            type = "filesystem";
            format = "vfat";
            mountpoint = "/boot";
            mountOptions = [ "umask=0077" ];
          };
        };
        swap = {
          size = cfg.swapSize;
          content = {
            type = "swap";
            randomEncryption = true;
          };
        };
        cryptroot = {
          size = "100%";
          content = {
            type = "luks";
            name = "cryptroot";
            inherit (cfg) passwordFile;
            extraFormatArgs = [
              "--type luks2"
              "--cipher aes-xts-plain64"
              "--key-size 512"
              "--hash sha512"
              "--pbkdf argon2id"
            ];
            settings = {
              allowDiscards = true;
              # Unlocks with the TPM2 the installer enrols; the passphrase is the fallback.
              crypttabExtraOpts = [ "tpm2-device=auto" ];
            };
            content = {
              type = "btrfs";
              extraArgs = [ "-f" ];
              subvolumes = {
                "@root" = {
                  mountpoint = "/";
                  mountOptions = [ "compress=zstd" "noatime" ];
                };
                "@nix" = {
                  mountpoint = "/nix";
                  mountOptions = [ "compress=zstd" "noatime" ];
                };
                "@var-lib" = {
                  mountpoint = "/var/lib";
                  mountOptions = [ "compress=zstd" "noatime" ];
                };
                "@var-log" = {
                  mountpoint = "/var/log";
                  mountOptions = [ "compress=zstd" "noatime" ];
                };
              };
            };
          };
        };
      };
    };
  };
}
